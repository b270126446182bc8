"""Representation alignment (REPA, Yu et al. 2025): one block's hidden tokens, through a small trained
projector, are pulled towards a frozen encoder's patch features of the clean image (negative cosine
similarity, added to the flow loss with weight lambda).

In a cascade every sample sits at one stage, on a token grid of side r = s / patch; the encoder's
feature map of the full-size clean image is average-pooled (or repeated) to that grid, so every stage is
aligned to the same image content. The encoder runs under ``no_grad`` in eval mode and is not part of
the training state: only the projector is trained, checkpointed and resumed; exports leave it out and
sampling never runs it.

Encoders (:class:`RepresentationEncoder`): a timm backbone from a local weights file
(:class:`TimmEncoder`, e.g. DINOv2 ViT-B/14 for ImageNet) and, for the CPU quickstart, the project's
small MNIST classifier (:class:`MNISTClassifierEncoder`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RepresentationEncoder", "TimmEncoder", "MNISTClassifierEncoder", "Projector", "RepaAlignment"]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RepresentationEncoder(Protocol):
    """A frozen image encoder: ``features`` maps clean images (B, C, H, W) in [-1, 1] to (B, dim, h, w)."""

    channels: int  # image channels it reads
    dim: int  # feature width

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> RepresentationEncoder: ...


class TimmEncoder:
    """A timm ViT (e.g. ``vit_base_patch14_dinov2``) built without downloading and loaded from ``weights``
    (timm's layout, ``.safetensors`` or a PyTorch file read with ``weights_only=True``; the original
    DINOv2 layout is converted by timm's checkpoint filter). Images are resized to ``image_size``
    (bicubic) and normalised with ImageNet statistics, as REPA feeds DINOv2."""

    def __init__(self, model_name: str, weights: str, image_size: int = 224):
        import timm
        from timm.models import load_checkpoint

        path = Path(weights).expanduser()
        if not path.is_file():
            hub = f"timm/{model_name}.lvd142m" if "dinov2" in model_name else f"timm/{model_name}"
            raise FileNotFoundError(
                f"REPA encoder weights {path} do not exist; they are never downloaded. On a machine with network "
                f"access: `hf download {hub} model.safetensors --local-dir <folder>` and pass "
                f"objective.repa.encoder.weights=<folder>/model.safetensors")
        model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        load_checkpoint(model, str(path), strict=True, weights_only=True, filter_fn=filter_fn)
        self.model = model.eval().requires_grad_(False)
        self.image_size, self.channels, self.dim = image_size, 3, model.embed_dim
        self.grid = tuple(model.patch_embed.grid_size)

    def to(self, device: torch.device | str) -> TimmEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.float() + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        tokens = self.model.forward_features((x - mean) / std)[:, self.model.num_prefix_tokens:]
        return tokens.transpose(1, 2).unflatten(2, self.grid)


class MNISTClassifierEncoder:
    """The 64-channel 4 x 4 feature map after the third convolution of the project's MNIST classifier
    (:mod:`pixelflow.metrics.mnist_classifier`), of images of ``channels`` channels averaged to grey (the
    datamodule's MNIST is three equal channels). ``seed`` 1 (default) trains and caches an independent copy,
    so that samples are not scored by the very network they were aligned to (seed 0, the evaluator)."""

    def __init__(self, seed: int = 1, cache_dir: str | None = None, channels: int = 3):
        from pixelflow.metrics.mnist_classifier import load_or_train_classifier

        classifier = load_or_train_classifier(cache_dir, seed=seed).model
        self.trunk = classifier.features[:9].eval().requires_grad_(False)  # 3 x (conv, BN, ReLU)
        self.channels, self.dim = channels, classifier.features[6].out_channels

    def to(self, device: torch.device | str) -> MNISTClassifierEncoder:
        self.trunk.to(device)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.trunk(x)


class Projector(nn.Sequential):
    """REPA's projector: a three-layer SiLU MLP from the network's width to the encoder's."""

    def __init__(self, hidden: int, projector_dim: int, dim: int):
        super().__init__(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, dim))


class RepaAlignment(nn.Module):
    """The REPA term of one run: ``block``'s output tokens vs the encoder's features. The projector is the only
    submodule (trained, in the checkpoint); the encoder is a plain attribute (frozen, rebuilt from the config)."""

    def __init__(self, encoder: RepresentationEncoder, hidden: int, block: int, weight: float, projector_dim: int):
        super().__init__()
        if not weight > 0 or projector_dim < 1 or block < 0:
            raise ValueError(f"objective.repa needs weight > 0, projector_dim >= 1 and block >= 0, got weight={weight}, "
                             f"projector_dim={projector_dim}, block={block}")
        self.encoder, self.block, self.weight = encoder, block, float(weight)
        self.projector = Projector(hidden, projector_dim, encoder.dim)

    def loss(self, tokens: list[torch.Tensor], grids: list[int], clean: torch.Tensor) -> torch.Tensor:
        """Mean over samples of minus the mean cosine similarity over a sample's tokens.

        ``tokens[j]`` (B_j, r_j^2, D): the block's output for the j-th stage group; ``clean`` (sum B_j, C, H, W):
        the full-size clean images of those samples, in the same order.
        """
        with torch.no_grad():
            target = self.encoder.features(clean)
        per_sample, start = [], 0
        for h, r in zip(tokens, grids):
            rows = slice(start, start + h.shape[0])
            start += h.shape[0]
            feats = F.adaptive_avg_pool2d(target[rows], r).flatten(2).transpose(1, 2)  # (B_j, r^2, dim)
            projected = self.projector(h)
            per_sample.append(-F.cosine_similarity(projected.float(), feats.float(), dim=-1).mean(dim=1))
        return torch.cat(per_sample).mean()
