"""timm models as ``timm:NAME`` (``NAME`` any of ``timm.list_models()``, optionally with a
pretrained tag: ``timm:resnet18.a1_in1k``). timm is an optional dependency, imported only when a
``timm:`` name is used. Built with ``pretrained=False``; published weights are loaded by
``load_checkpoint`` through timm's own loading (``pretrained.py``)."""

from dhkd_pipe.models.pretrained import check_timm_name, import_timm, timm_input_size
from dhkd_pipe.models.registry import ModelFamily, register_family


def _build(name: str, num_classes: int):
    return import_timm().create_model(name, pretrained=False, num_classes=num_classes)


register_family(
    ModelFamily(
        prefix="timm",
        check=check_timm_name,
        build=_build,
        input_size=timm_input_size,
        default_weights="pretrained",
        describe="timm:resnet18 (any timm.list_models() name, optionally .TAG; pip install 'dhkd-pipe[timm]')",
    )
)
