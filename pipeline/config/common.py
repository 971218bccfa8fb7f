"""What the configs of several commands share: the precisions, the weights' and the data's help,
the missing-data line. Torch-free."""

from __future__ import annotations

PRECISIONS = ("no", "bf16", "fp16")  # Accelerate's mixed_precision ("no": float32)
EXPORT_FORMATS = ("onnx",)  # `dhkd-pipe export`; training itself writes model.pt and model.safetensors

WEIGHTS_HELP = (
    "a checkpoint file, or a published weight's name (torchvision: DEFAULT, IMAGENET1K_V2, ...; "
    "timm: pretrained or a tag); default: the architecture's published weights, fetched into the "
    "torch hub / Hugging Face cache when online (KD-zoo models have none)"
)


def data_help(extra: str = "") -> str:
    """``--data``'s help, from the data sets ``data`` declares."""
    from dhkd_pipe.data.datasets import DATA_SETS, SUBSET_MARK

    return f"{' | '.join(DATA_SETS)}; SPEC{SUBSET_MARK}N: a fixed stratified subset of N training images." + (
        f" {extra}" if extra else ""
    )


def missing_data(extra: str = "") -> str:
    """The one line for a command run without ``--data``: no data set is ever assumed."""
    from dhkd_pipe.data.datasets import DATA_SETS

    return f"missing --data: name the data set ({', '.join(DATA_SETS)}){extra}"
