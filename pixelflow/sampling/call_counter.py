"""Counting a network's forward calls: how many input rows it evaluated, for model calls per image."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CallCounter"]


class CallCounter(torch.nn.Module):
    """Wraps a network and counts its forward calls (``calls``) and the rows they evaluated (``rows``).

    Every other attribute (``num_classes``, ``null_class``, ``in_channels``, ...) is the wrapped network's,
    so a sampler or :func:`pixelflow.sampling.generate.generate` uses the wrapper in its place. ``rows / images``
    is the model calls per image, counted where they happen: a guided call counts 2 per image, a
    conditional-only one (guidance weight 1) 1, and adaptive solvers count every step they take.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x, *args, **kwargs)

    def reset(self) -> None:
        self.calls = self.rows = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)
