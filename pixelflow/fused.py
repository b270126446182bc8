"""The CPU inference path's kernels: each equals the plain form to float rounding and runs only where measured faster.

Linear + tanh-GELU in one kernel.

ATen's tanh-GELU kernel is slow on x86 CPUs (10-12 ms for 6.5M floats on this project's 2-core
machines, five times a ``torch.tanh`` pass over the same memory). oneDNN applies the same GELU as a
post-op of the linear layer that feeds it, while each tile of the output is still in cache:
``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU backend itself emits for linear + GELU.
It runs only where it is exact and exists: float32 on the CPU with autograd and autocast off, not
while ``torch.compile`` traces (inductor fuses on its own; :func:`cpu_inference`), in a PyTorch built
with oneDNN. Everywhere else, training included, the plain form runs. ``tests/test_fused.py`` holds the
two forms together.

RMSNorm from one read. ATen's CPU ``rms_norm`` is composite: a squared copy, its mean, then two products,
three full-size outputs. :func:`rms_norm` reads the sums of squares with one ``vector_norm`` pass and scales
once, in place where the caller owns the input: a weighted norm of the quickstart model's (200, 64, 128) took
3.1 against 1.0 ms alone on 2 threads, and about 2.4 against 1.3 ms inside the network (docs/sampling.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cpu_inference", "linear_gelu_tanh", "rms_norm"]


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, overwrite: bool = False) -> torch.Tensor:
    """``F.rms_norm`` over the last dimension. Where :func:`cpu_inference` holds: the sums of squares from one
    ``vector_norm`` read (its root, squared), then one scaling pass, written into ``x`` itself with ``overwrite``
    (for a fresh tensor the caller owns; use the return value). Elsewhere ATen's ``rms_norm``."""
    if not cpu_inference(x):
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    out = torch.mul(x, mean_square.add_(eps).rsqrt_(), out=x if overwrite else None)
    return out if weight is None else out.mul_(weight)
