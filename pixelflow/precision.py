"""Sampling precision, in one place: ``fp32`` (exact, golden-checked) or ``bf16`` (as the published sampler).

``auto`` resolves to ``bf16`` on CUDA and ``fp32`` elsewhere. ``bf16`` is bf16 autocast plus TF32
matmuls, the setting of the published ``sample_ddp.py``. What it changes against the fp32 path:

- Linear layers, attention and the patch embedding run in bf16 (autocast); the model's own
  fp32 regions (timestep/label/size conditioning, adaLN modulation, layer norms, RoPE and the
  q/k RMSNorms; see ``pixelflow/layers.py``) stay fp32, as in the published model code.
- The velocity the model returns is bf16, so the guidance mix ``v_u + w (v_c - v_u)`` is formed
  in bf16, as in the published code.
- fp32 matmuls outside autocast (the conditioning MLPs) use TF32 on Ampere and newer GPUs.

Deliberate differences from the published run under bf16 (each keeps more precision, none changes
the method): the published Euler scheduler returns the updated latent in the model output's dtype
(bf16) and casts the timestep to the latent's dtype, so its latent is rounded to bf16 after every
step and its timesteps (up to 999) to bf16's 4-unit spacing above 512. Here the latent, the
integrator (Euler/Heun/Dopri5, including Dopri5's error control) and the timesteps stay fp32;
only the network runs in bf16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["PRECISIONS", "as_dtype", "resolve_precision", "sampling_precision"]

PRECISIONS = ("auto", "fp32", "bf16")


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where ``t`` already has it. ``Tensor.to`` would return ``t`` itself then,
    but through the dispatcher; the model's forward makes about thirty such casts (its fp32 regions), and at small
    stages on the CPU their dispatch is a measurable share of a step."""
    return t if t.dtype == dtype else t.to(dtype)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``precision`` on ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision=bf16 needs a cpu or cuda device, got {device}; use precision=fp32")
    return precision


@contextmanager
def sampling_precision(precision: str, device: torch.device | str) -> Iterator[str]:
    """Run the enclosed sampling in ``precision`` on ``device``; yields the resolved name.

    TF32 switches are restored on exit, so training or other code in the process is unaffected.
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        yield resolved
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield resolved
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
