"""Loading and exporting model weights: the released ``model.pt`` + ``config.yaml``, or a project ``.ckpt``.

One entry point, :func:`load_pixelflow`, returns the network, its cascade schedule and class
names. Weights are a ``model.pt`` or ``model.safetensors`` (exports write both) with ``config.yaml``
beside it, a project ``.ckpt``, or ``hf://owner/name[@revision]``: a Hugging Face repository read from
huggingface_hub's cache, downloading only when asked to. Every failure names the file, what is wrong
and how to fix it. PyTorch files are always read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from omegaconf import OmegaConf
from safetensors import SafetensorError

from pixelflow.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text
from pixelflow.cascade import CascadeSchedule
from pixelflow.model import PixelFlowTransformer

__all__ = ["LoadedModel", "CheckpointError", "load_pixelflow", "export_released_format", "model_kwargs",
           "resolve_hub_weights", "HUB_PREFIX", "RELEASED_HUB", "ema_export_name",
           "ema_export_path"]

_MODEL_KEYS = ("num_attention_heads", "attention_head_dim", "depth", "num_classes", "patch_size",
               "in_channels", "out_channels", "attention_bias", "cross_attention_dim", "prediction", "patch_bottleneck")
RELEASED_URL = "https://huggingface.co/ShoufaChen/PixelFlow-Class2Image"
HUB_PREFIX = "hf://"
RELEASED_HUB = "hf://ShoufaChen/PixelFlow-Class2Image"
WEIGHT_FILES = ("model.safetensors", "model.pt")  # in order of preference
_PROJECT_KEYS = ("model", "schedule", "ema_decays")  # what a .ckpt's 'pixelflow' section must hold to be loaded


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


@dataclass
class LoadedModel:
    model: PixelFlowTransformer
    schedule: CascadeSchedule
    class_names: list[str] | None
    source: str
    text_encoder: dict[str, Any] | None = None  # T2I: config.yaml's text_encoder (source, max_length), else None
    objective: dict[str, Any] | None = None  # the training objective as recorded (None: not recorded, e.g. released)
    sampler: dict[str, Any] | None = None  # the sampler it was trained for (a distilled student's), else None


def model_kwargs(model: PixelFlowTransformer) -> dict[str, Any]:
    """Constructor arguments that rebuild ``model`` (released ``config.yaml`` names); the options the released
    model does not have (text, prediction target, patch bottleneck) only where they differ from its defaults."""
    base = dict(
        num_attention_heads=model.hidden_size // model.head_dim, attention_head_dim=model.head_dim,
        depth=len(model.transformer_blocks), num_classes=model.num_classes, patch_size=model.patch_size,
        in_channels=model.in_channels, out_channels=model.out_channels,
        attention_bias=model.transformer_blocks[0].attn1.q_proj.bias is not None if model.transformer_blocks else True,
    )
    extras = {"cross_attention_dim": model.cross_attention_dim, "prediction": None if model.prediction == "v" else model.prediction,
              "patch_bottleneck": model.patch_bottleneck}
    return base | {k: v for k, v in extras.items() if v is not None}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. For the released ImageNet model pass ckpt={RELEASED_HUB} "
                              f"(add allow_download=true the first time) or download model.pt and config.yaml from "
                              f"{RELEASED_URL}; for your own, pass a run's .ckpt (runs/<name>/checkpoints/last.ckpt) or its "
                              "export (runs/<name>/export/model.pt or model.safetensors)")


def resolve_hub_weights(spec: str, allow_download: bool = False) -> Path:
    """``hf://owner/name[@revision]`` -> its cached weights file (``config.yaml`` lies beside it).

    Reads huggingface_hub's cache (``HF_HUB_CACHE``) only, unless ``allow_download``.
    """
    repo_id, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"{spec!r}: expected {HUB_PREFIX}owner/name or {HUB_PREFIX}owner/name@revision, e.g. {RELEASED_HUB}")
    fetch = dict(repo_id=repo_id, revision=revision or None, local_files_only=not allow_download)
    try:
        for name in WEIGHT_FILES:
            try:
                weights = Path(hf_hub_download(filename=name, **fetch))
                break
            except EntryNotFoundError:
                continue
        else:
            raise EntryNotFoundError(f"none of {WEIGHT_FILES}")
        hf_hub_download(filename="config.yaml", **fetch)
    except Exception as err:  # huggingface_hub raises many types: not cached, offline, no such repo / revision / file
        how = ("" if allow_download else
               f"Downloads are off by default: pass allow_download=true, or fetch the files once with "
               f"`hf download {repo_id} model.pt config.yaml`. ")
        raise CheckpointError(f"{spec}: model.safetensors or model.pt, and config.yaml, of {repo_id}"
                              f"{'@' + revision if revision else ''} are not in the Hugging Face cache "
                              f"{hf_constants.HF_HUB_CACHE} ({type(err).__name__}: {str(err)[:200]}). {how}"
                              "Set HF_HUB_CACHE if the cache lives elsewhere.") from err
    return weights


def _read_weights(path: Path) -> Any:
    """A flat state_dict from ``.safetensors``, anything else through ``torch.load(weights_only=True)``."""
    if path.suffix != ".safetensors":
        return _torch_load(path)
    _require_file(path)
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) could not be read: it is truncated, corrupt "
                              f"or not a safetensors file ({type(err).__name__}: {str(err)[:200]}). Re-download or re-export it.") from err


def _torch_load(path: Path) -> Any:
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) could not be read: it is truncated, "
                              f"corrupt or not a PyTorch file ({type(err).__name__}: {str(err)[:200]}). "
                              "Re-download or re-export it.") from err


def _build_and_load(state: dict[str, torch.Tensor], kwargs: dict[str, Any], source: Path) -> PixelFlowTransformer:
    with torch.device("meta"):
        model = PixelFlowTransformer(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(wrong)} with wrong shape (e.g. {wrong[0]}: file {got[wrong[0]]} vs model {expected[wrong[0]]})" if wrong else "",
        ]))
        raise CheckpointError(f"weights in {source} do not fit the model config {kwargs}: {details}. "
                              "Check that the config (config.yaml / model=...) matches the checkpoint.")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _load_released(path: Path, config_path: Path | None) -> LoadedModel:
    _require_file(path)
    config_path = config_path or path.with_name("config.yaml")
    if not config_path.is_file():
        raise CheckpointError(f"{path} is a plain state_dict and needs its config.yaml (looked for {config_path}); "
                              f"download it from {RELEASED_URL} next to the weights or pass its path")
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    try:
        params = cfg["model"]["params"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path} has no model.params section; is it the released config.yaml?") from err
    kwargs = {k: params[k] for k in _MODEL_KEYS if k in params}
    sched = cfg.get("scheduler", {}) or {}
    data = cfg.get("data", {}) or {}
    schedule = CascadeSchedule(
        image_size=int(data.get("resolution", data.get("image_size", 256))),
        num_stages=int(sched.get("num_stages", 4)),
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
    )
    state = _read_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state_dict of tensors")
    names = cfg.get("class_names")
    return LoadedModel(_build_and_load(state, kwargs, path), schedule, names, str(path), cfg.get("text_encoder"),
                       cfg.get("objective"), cfg.get("sampler"))


def _ema_prefix(meta: dict[str, Any], path: Path, ema: float | None) -> str:
    """State-dict prefix of the EMA of rate ``ema`` (None: the first EMA, else the live weights)."""
    decays = [float(d) for d in meta["ema_decays"]]
    if ema is None:
        return "emas.0.module." if decays else "model."
    if float(ema) not in decays:
        raise CheckpointError(f"{path} has no EMA with rate {ema}; it keeps ema_decays={decays}. Pick one of those or ema=null")
    return f"emas.{decays.index(float(ema))}.module."


def _load_project(path: Path, ema: float | None = None) -> LoadedModel:
    ckpt = _torch_load(path)
    meta = ckpt.get("pixelflow") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{path} is not a pixelflow training checkpoint (no 'pixelflow' section); "
                              "for a plain state_dict use a .pt file with its config.yaml")
    if missing := [k for k in _PROJECT_KEYS if k not in meta]:
        raise CheckpointError(f"{path}'s 'pixelflow' section lacks {missing} (it has {sorted(meta)}): it was not written by "
                              "this version's PixelFlowLitModule. Load it with the version that wrote it and export it "
                              "(export_released_format), then load the export")
    prefix = _ema_prefix(meta, path, ema)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    schedule = CascadeSchedule(**meta["schedule"])
    return LoadedModel(_build_and_load(state, meta["model"], path), schedule, meta.get("class_names"), str(path),
                       meta.get("text_encoder"), meta.get("objective"), meta.get("sampler"))


def ema_export_name(decay: float) -> str:
    """File name of the exported EMA of rate ``decay`` beside ``model.pt`` (which holds the first rate)."""
    return f"model_ema{float(decay)!r}.pt"


def ema_export_path(model_pt: Path, decay: float) -> Path:
    """The export file holding EMA rate ``decay``: ``model_ema<rate>.pt`` beside ``model_pt``, or ``model_pt``
    itself when its ``config.yaml`` lists ``decay`` first."""
    named = model_pt.with_name(ema_export_name(decay))
    if named.is_file():
        return named
    config = model_pt.with_name("config.yaml")
    decays = [float(d) for d in (OmegaConf.load(config).get("ema_decays") or [])] if config.is_file() else []
    if decays and decays[0] == float(decay):
        return model_pt
    raise CheckpointError(f"no export of EMA rate {decay} beside {model_pt}: neither {named.name} exists nor does "
                          f"{config} list it first (its ema_decays: {decays or 'not recorded'}). Use ema=null for {model_pt.name}")


def load_pixelflow(path: str | Path, config: str | Path | None = None, allow_download: bool = False,
                   ema: float | None = None) -> LoadedModel:
    """Load a ``model.pt`` / ``model.safetensors`` (+ ``config.yaml`` beside it or ``config``), a project ``.ckpt``,
    or ``hf://owner/name[@revision]`` from the Hugging Face cache (downloading it only if ``allow_download``).

    Project checkpoints yield their first EMA's weights when they have one; ``ema=<rate>`` picks another
    (in a ``.ckpt``, or the export file of that rate beside ``model.pt``).
    """
    if str(path).startswith(HUB_PREFIX):
        return _load_released(resolve_hub_weights(str(path), allow_download), Path(config).expanduser() if config else None)
    path = Path(path).expanduser()
    if path.suffix == ".ckpt":
        return _load_project(path, ema)
    if ema is not None:
        path = ema_export_path(path, ema)
    return _load_released(path, Path(config).expanduser() if config else None)


def export_released_format(model: PixelFlowTransformer, schedule: CascadeSchedule, out_dir: str | Path,
                           class_names: list[str] | None = None, filename: str = "model.pt",
                           ema_decays: list[float] | None = None, text_encoder: dict[str, Any] | None = None,
                           objective: dict[str, Any] | None = None, sampler: dict[str, Any] | None = None) -> Path:
    """Write ``filename`` and the same flat fp32 state_dict as ``<stem>.safetensors`` beside it, and ``config.yaml``,
    in the released layout (plus the run's ``ema_decays``, the first of which is ``model.pt``, a T2I model's
    ``text_encoder``: its ``source`` (a folder, relative to ``out_dir`` or absolute, or a Hugging Face name) and
    ``max_length``, the training ``objective`` as recorded and, for a distilled student, the ``sampler`` it was
    distilled for; what the network predicts is in ``model.params``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out / filename)
    atomic_write_bytes(out / f"{Path(filename).stem}.safetensors", safetensors.torch.save(state))
    cfg = {"model": {"target": "pixelflow.model.PixelFlowTransformer", "params": model_kwargs(model)},
           "scheduler": {"num_train_timesteps": schedule.num_train_timesteps, "num_stages": schedule.num_stages},
           "data": {"resolution": schedule.image_size}}
    if class_names is not None:
        cfg["class_names"] = list(class_names)
    if ema_decays:
        cfg["ema_decays"] = [float(d) for d in ema_decays]
    if text_encoder:
        cfg["text_encoder"] = dict(text_encoder)
    if objective:
        cfg["objective"] = dict(objective)
    if sampler:
        cfg["sampler"] = dict(sampler)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return out / filename
