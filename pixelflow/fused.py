"""Linear + tanh-GELU in one kernel for no-grad CPU inference, equal to the plain form to float rounding.

ATen's tanh-GELU kernel is slow on x86 CPUs (10-12 ms for 6.5M floats on this project's 2-core
machines, five times a ``torch.tanh`` pass over the same memory). oneDNN applies the same GELU as a
post-op of the linear layer that feeds it, while each tile of the output is still in cache:
``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU backend itself emits for linear + GELU.
It runs only where it is exact and exists: float32 on the CPU with autograd and autocast off, not
while ``torch.compile`` traces (inductor fuses on its own; :func:`cpu_inference`), in a PyTorch built
with oneDNN. Everywhere else, training included, the plain form runs. ``tests/test_fused.py`` holds the
two forms together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cpu_inference", "linear_gelu_tanh"]


def _linear_pointwise():
    """oneDNN's linear with a fused pointwise post-op, or None where this PyTorch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _linear_pointwise()


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is float32 on the CPU with autograd and autocast off, outside ``torch.compile``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear_gelu_tanh(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")``, in one oneDNN kernel where :func:`cpu_inference` holds."""
    if _LINEAR_POINTWISE is not None and linear.weight.dtype == torch.float32 and cpu_inference(x):
        return _LINEAR_POINTWISE(x, linear.weight, linear.bias, "gelu", [], "tanh")
    return F.gelu(linear(x), approximate="tanh")
