"""Published weights: resolving ``--weights`` to a file, fetching it the library's own way, and
the preprocessing the weights were trained with.

- torchvision architectures: a named weight (``DEFAULT``, ``IMAGENET1K_V2``,
  ``ResNet50_Weights.IMAGENET1K_V2``) is the file ``torch.hub`` keeps in
  ``$TORCH_HOME/hub/checkpoints``; when it is absent and the machine is online it is fetched with
  ``Weights.get_state_dict`` (``torch.hub.load_state_dict_from_url``, hash checked).
- timm models (``timm:NAME``): ``pretrained`` (or ``DEFAULT``, or a tag such as ``a1_in1k``) is
  timm's pretrained file in the Hugging Face cache, fetched by ``timm.create_model(name,
  pretrained=True)`` when absent and online, and always loaded by timm (its filters apply).
- anything else is a checkpoint file (``checkpoint.read_state_dict``).

Offline (``DHKD_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` for timm, or the host does not answer within
``PROBE_TIMEOUT`` seconds) a missing file is one line naming the file and where to put it; a
stalled download fails after ``DOWNLOAD_TIMEOUT`` seconds without data instead of hanging.

``WeightsSource.preprocessing()`` is the weights' own evaluation transform (torchvision's
``weights.transforms()``, timm's pretrained config): resolution, centre-crop fraction,
interpolation, mean and std. A checkpoint file of a torchvision or KD-zoo model has none.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass

from dhkd_pipe.errors import DhkdError, one_line

PROBE_TIMEOUT = 5.0  # seconds to reach the weights' host before calling the machine offline
DOWNLOAD_TIMEOUT = 60.0  # seconds a download may wait for data before it fails
TIMM_PRETRAINED = ("pretrained", "DEFAULT")  # --weights values meaning timm's default pretrained tag
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from.

    ``kind``: ``file`` (a checkpoint file), ``torchvision`` (a cached torchvision weight file) or
    ``timm`` (a cached timm pretrained file, loaded by timm). ``record`` is what a store writes
    down so the same weights can be named again (an absolute path, ``ResNet50_Weights.NAME``, a
    timm tag); ``label`` is for people.
    """

    arch: str
    kind: str
    path: str
    record: str
    label: str
    timm_name: str | None = None  # timm: the model name with its pretrained tag

    def digest(self) -> str:
        return file_digest(self.path)

    def preprocessing(self) -> dict | None:
        """The weights' evaluation transform, or None (a torchvision or zoo checkpoint file)."""
        if self.kind == "torchvision":
            return torchvision_preprocessing(self.arch, self.record)
        if self.arch.startswith(TIMM_PREFIX):
            return timm_preprocessing(self.timm_name or self.arch[len(TIMM_PREFIX) :])
        return None


def offline(env: str | None = None) -> bool:
    """``DHKD_OFFLINE`` (or the library's own switch ``env``) set to a true value."""
    names = ("DHKD_OFFLINE",) + ((env,) if env else ())
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the URL's host (or the configured HTTPS proxy) opens in time."""
    proxy = urllib.request.getproxies().get("https") or urllib.request.getproxies().get("http")
    target = urllib.parse.urlparse(proxy or url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _download_timeout(seconds: float = DOWNLOAD_TIMEOUT):
    """urllib (torch.hub) opens sockets without a timeout; a stalled transfer would hang forever."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def file_digest(path) -> str:
    """First 16 hex digits of the file's sha256."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise DhkdError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()[:16]


def looks_like_weight_name(spec: str) -> bool:
    """A name (``DEFAULT``, ``IMAGENET1K_V2``, ``pretrained``), not a path to a checkpoint file."""
    return (
        os.sep not in spec
        and "/" not in spec
        and os.path.splitext(spec)[1].lower() not in (".pt", ".pth", ".tar", ".bin", ".ckpt", ".safetensors")
    )


def resolve_weights(arch: str, spec: str | None, fetch: bool = True) -> WeightsSource:
    """``spec`` (a file, a weight name, or None for the architecture's published default) as a
    ``WeightsSource`` whose file exists; fetches a named weight's file when ``fetch`` and online."""
    from dhkd_pipe.models.registry import default_weights, is_timm, torchvision_arch

    if spec is None:
        spec = default_weights(arch)
        if spec is None:
            raise DhkdError(
                f"{arch} has no published weights (a KD-zoo model): pass --weights FILE, "
                f"e.g. a model.pt from train-teacher"
            )
    spec = os.fspath(spec)
    if os.path.exists(spec) or not looks_like_weight_name(spec):
        if not os.path.isfile(spec):
            raise DhkdError(f"checkpoint file not found: {spec}")
        path = os.path.abspath(spec)
        return WeightsSource(arch, "file", path, path, path)
    if is_timm(arch):
        return _timm_source(arch, spec, fetch)
    tv_arch = torchvision_arch(arch)
    if tv_arch is None:
        raise DhkdError(
            f"checkpoint file not found: {spec} (named weights exist only for torchvision "
            f"and timm architectures, and {arch} is not one)"
        )
    weights = torchvision_weights(tv_arch, spec)
    path = torchvision_weight_file(tv_arch, spec, fetch=fetch)
    record = f"{type(weights).__name__}.{weights.name}"
    return WeightsSource(arch, "torchvision", path, record, f"torchvision {record}")


# ---- torchvision ------------------------------------------------------------------------------


def torchvision_weights(arch: str, name: str):
    """The torchvision ``WeightsEnum`` member ``name`` (``DEFAULT`` resolves to the current one)."""
    import torchvision

    short = name.rsplit(".", 1)[-1]
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise DhkdError(f"{arch} is not a torchvision architecture; pass a checkpoint file") from None
    try:
        return enum[short] if short != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise DhkdError(f"no torchvision weight {name!r} for {arch}; known: {names}") from None


def torchvision_weight_file(arch: str, name: str, fetch: bool = True) -> str:
    """Path of torchvision weight ``name`` of ``arch`` in the torch hub cache; fetched with
    torchvision's ``Weights.get_state_dict`` when absent and online; DhkdError otherwise."""
    import torch

    weights = torchvision_weights(arch, name)
    fname = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    if os.path.isfile(path):
        return path
    where = (
        f"torchvision weight {arch} {type(weights).__name__}.{weights.name} is not cached: place "
        f"{fname} (from {weights.url}) at {path}, or pass a checkpoint file path"
    )
    host = urllib.parse.urlparse(weights.url).hostname
    if not fetch or offline():
        raise DhkdError(where + ("; DHKD_OFFLINE is set" if fetch else ""))
    if not reachable(weights.url):
        raise DhkdError(f"{where}; offline: {host} cannot be reached")
    try:
        with _download_timeout():
            weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, HTTPError, timeouts, a hash mismatch: the network's fault
        raise DhkdError(f"{where}; the download failed: {one_line(e, 200)}") from None
    if not os.path.isfile(path):
        raise DhkdError(f"{where}; the download did not leave the file there")
    return path


def torchvision_preprocessing(arch: str, name: str) -> dict:
    """torchvision's ``ImageClassification`` transform of the weight: crop, resize, mean, std."""
    from dhkd_pipe.models.registry import torchvision_arch

    weights = torchvision_weights(torchvision_arch(arch) or arch, name)
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    return _preprocessing(
        f"torchvision {type(weights).__name__}.{weights.name}",
        crop,
        crop / resize,
        interpolation,
        t.mean,
        t.std,
        resize=resize,
    )


def _preprocessing(source, resolution, crop_pct, interpolation, mean, std, resize=None) -> dict:
    # the renderer checks the interpolation (data.views.with_preprocessing): it owns the names
    return {
        "source": source,
        "resolution": int(resolution),
        "resize": int(resize if resize is not None else round(resolution / crop_pct)),
        "crop_pct": float(crop_pct),
        "interpolation": interpolation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


# ---- timm -------------------------------------------------------------------------------------


def import_timm():
    try:
        import timm
    except ImportError:
        raise DhkdError("timm models need timm: pip install 'dhkd-pipe[timm]'") from None
    return timm


def check_timm_name(name: str) -> None:
    """DhkdError unless ``name`` (an architecture, optionally with a ``.tag``) is a timm model."""
    timm = import_timm()
    if timm.is_model(name.split(".", 1)[0]):
        if "." in name and name not in timm.list_pretrained(name):
            tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")
            raise DhkdError(f"timm has no pretrained tag {name!r}; known: {', '.join(tags[:8]) or 'none'}")
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models()"
    raise DhkdError(f"unknown timm model {name!r}{hint}")


def timm_pretrained_cfg(name: str) -> dict:
    """timm's pretrained config of ``name`` (its default tag when untagged), as a dict."""
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:  # an architecture without pretrained weights still has its defaults
        model = timm.create_model(name, pretrained=False)
        return dict(model.pretrained_cfg)
    return cfg.to_dict()


def timm_input_size(name: str) -> int:
    size = tuple(timm_pretrained_cfg(name).get("input_size") or (3, 224, 224))
    return int(size[-1])


def timm_preprocessing(name: str) -> dict:
    """timm's pretrained config: input_size, crop_pct, interpolation, mean, std (centre crops;
    ``squash``/``border`` crop modes are rendered as centre crops)."""
    cfg = timm_pretrained_cfg(name)
    _, height, width = tuple(cfg.get("input_size") or (3, 224, 224))
    if height != width:
        raise DhkdError(f"timm:{name} takes {height}x{width} inputs; dhkd-pipe renders square views only")
    tag = f"{cfg.get('architecture', name)}.{cfg['tag']}" if cfg.get("tag") else name
    return _preprocessing(
        f"timm {tag} pretrained_cfg",
        height,
        cfg.get("crop_pct") or 0.875,
        cfg.get("interpolation") or "bicubic",
        cfg.get("mean"),
        cfg.get("std"),
    )


def _timm_name(base: str, spec: str) -> str:
    """The timm model name the weight spec means: the model as given, or ``base.tag``."""
    if spec in TIMM_PRETRAINED:
        return base
    name = f"{base.split('.', 1)[0]}.{spec}"
    check_timm_name(name)
    return name


def _timm_files(cfg: dict) -> list[str]:
    """The file names timm tries on the Hugging Face hub, in its order (safetensors first)."""
    wanted = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    safe = {"pytorch_model.bin": ["model.safetensors"], "open_clip_pytorch_model.bin": ["open_clip_model.safetensors"]}
    return [wanted] if wanted.endswith(".safetensors") else safe.get(wanted, []) + [wanted]


def _timm_cached(cfg: dict) -> str | None:
    """The cached pretrained file of a timm config (Hugging Face cache, or torch hub for URLs)."""
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for fname in _timm_files(cfg):
            found = try_to_load_from_cache(repo, fname, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    if cfg.get("url"):
        import torch

        path = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(cfg["url"]).path)
        )
        return path if os.path.isfile(path) else None
    return None


def _timm_source(arch: str, spec: str, fetch: bool) -> WeightsSource:
    base = arch[len(TIMM_PREFIX) :]
    name = _timm_name(base, spec)
    cfg = timm_pretrained_cfg(name)
    if not cfg.get("hf_hub_id") and not cfg.get("url"):
        raise DhkdError(f"timm:{name} has no pretrained weights: pass --weights FILE")
    tag = f"{cfg.get('architecture', name)}.{cfg['tag']}" if cfg.get("tag") else name
    record = cfg.get("tag") or spec
    path = _timm_cached(cfg)
    if path is None:
        if cfg.get("hf_hub_id"):
            from huggingface_hub.constants import HF_HUB_CACHE

            where = (
                f"timm pretrained weights {tag} are not cached: put {_timm_files(cfg)[0]} of "
                f"https://huggingface.co/{cfg['hf_hub_id']} in the Hugging Face cache {HF_HUB_CACHE} "
                f"(e.g. copy that folder from a machine where timm.create_model('{tag}', pretrained=True) ran), "
                f"or pass --weights FILE"
            )
            url = "https://huggingface.co"
        else:
            import torch

            where = (
                f"timm pretrained weights {tag} are not cached: place {os.path.basename(cfg['url'])} "
                f"(from {cfg['url']}) in {os.path.join(torch.hub.get_dir(), 'checkpoints')}, or pass --weights FILE"
            )
            url = cfg["url"]
        if not fetch or offline("HF_HUB_OFFLINE"):
            raise DhkdError(where + ("; offline (DHKD_OFFLINE or HF_HUB_OFFLINE is set)" if fetch else ""))
        if not reachable(url):
            raise DhkdError(f"{where}; offline: {urllib.parse.urlparse(url).hostname} cannot be reached")
        try:
            with _download_timeout():
                import_timm().create_model(name, pretrained=True)  # timm fetches into its cache
        except Exception as e:
            raise DhkdError(f"{where}; the download failed: {one_line(e, 200)}") from None
        path = _timm_cached(cfg)
        if path is None:
            raise DhkdError(f"{where}; the download did not leave the file there")
    return WeightsSource(arch, "timm", path, record, f"timm {tag}", timm_name=name)


def timm_pretrained_state_dict(source: WeightsSource) -> dict:
    """The state dict timm's own loading gives (its filters applied) from the cached file."""
    timm = import_timm()
    cfg = timm_pretrained_cfg(source.timm_name)
    try:
        model = timm.create_model(
            source.timm_name,
            pretrained=True,
            num_classes=cfg.get("num_classes") or 1000,
            pretrained_cfg_overlay={"file": source.path},
        )
    except Exception as e:  # a corrupt or foreign file in the cache
        raise DhkdError(f"cannot load timm pretrained weights {source.path}: {one_line(e, 200)}") from None
    return model.state_dict()
