"""DINOv2 features for FD-DINOv2 (Stein et al. 2023): the Frechet distance in a self-supervised ViT's space.

The encoder is a timm DINOv2 ViT (``vit_base_patch14_dinov2`` / ``vit_large_patch14_dinov2`` layout) built with
``timm.create_model(pretrained=False)`` and loaded from a local file only: nothing is downloaded, so a score
always names the exact weights it used (their SHA-256 goes into metrics.json and the reference cache key).
Width, depth, patch and position-embedding grid are read from the file, so any ViT of that layout loads.
Images go in as Stein et al.'s protocol has them: RGB in [0, 1], bicubic (antialiased) resize to 224 x 224,
ImageNet mean/std; the feature is the class token after the final norm (768 or 1024 values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from torch.nn import functional as F

from pixelflow.metrics.io import EvaluationInputError, sha256_file
from pixelflow.precision import strict_fp32

__all__ = ["DINOV2_INPUT_SIZE", "DINOV2_HOW_TO_GET", "DINOv2Features", "load_dinov2_state", "build_dinov2"]

DINOV2_INPUT_SIZE = 224
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TEMPLATES = {768: "vit_base_patch14_dinov2", 1024: "vit_large_patch14_dinov2"}
DINOV2_HOW_TO_GET = (
    "get timm's DINOv2 weights once on a machine with network, e.g. `hf download timm/vit_large_patch14_dinov2.lvd142m "
    "model.safetensors` (or vit_base_patch14_dinov2.lvd142m), or `python -c \"import timm, torch; torch.save(timm."
    "create_model('vit_large_patch14_dinov2.lvd142m', pretrained=True).state_dict(), 'dinov2_vitl14.pth')\"`, copy the "
    "file here and pass dinov2_weights=/path/to/it")


def load_dinov2_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (.safetensors, else ``torch.load(weights_only=True)``), checked for the DINOv2 layout."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationInputError(f"dinov2_weights={path}: file not found; {DINOV2_HOW_TO_GET}")
    try:
        state = safetensors.torch.load_file(path) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for foreign or truncated files
        raise EvaluationInputError(f"dinov2_weights={path} could not be read as a state dict ({type(err).__name__}: "
                                   f"{str(err)[:200]}); {DINOV2_HOW_TO_GET}") from err
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.ls1.gamma", "norm.weight"]
    if not isinstance(state, dict) or (missing := [k for k in needed if k not in state]):
        raise EvaluationInputError(f"dinov2_weights={path} is not a timm DINOv2 ViT state dict (missing "
                                   f"{missing if isinstance(state, dict) else needed}); {DINOV2_HOW_TO_GET}")
    return state


def build_dinov2(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A timm DINOv2 ViT shaped after ``state`` (width, depth, MLP ratio, patch, position grid), ``state`` loaded
    strictly; position embeddings are interpolated to the input size (``dynamic_img_size``)."""
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    model = timm.create_model(_TEMPLATES.get(width, "vit_base_patch14_dinov2"), pretrained=False, num_classes=0,
                              embed_dim=width, depth=depth, num_heads=width // 64, patch_size=patch, img_size=grid * patch,
                              mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width, dynamic_img_size=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EvaluationInputError(f"the DINOv2 weights do not fit a timm ViT of width {width}, depth {depth}, patch "
                                   f"{patch}: {str(err)[:300]}") from err
    return model.eval()


class DINOv2Features:
    """Class-token features of uint8 NHWC images under the weights in ``path``."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path).expanduser()
        self.net = build_dinov2(load_dinov2_state(self.path)).to(device)
        self.sha256 = sha256_file(self.path)
        self.device = torch.device(device)
        self.mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def width(self) -> int:
        return self.net.embed_dim

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        with strict_fp32():
            return self.net((x - self.mean) / self.std).float().cpu().numpy()

    def extract(self, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        return {"dinov2": np.concatenate([self(batch) for batch in batches])}
