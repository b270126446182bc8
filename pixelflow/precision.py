"""Sampling precision, in one place: ``fp32`` (exact, golden-checked) or ``bf16`` (as the published sampler).

``auto`` resolves to ``bf16`` on CUDA and ``fp32`` elsewhere. ``bf16`` is bf16 autocast plus TF32
matmuls, the setting of the published ``sample_ddp.py``. What it changes against the fp32 path:

- Linear layers, attention and the patch embedding run in bf16 (autocast); the model's own
  fp32 regions (timestep/label/size conditioning, adaLN modulation, layer norms, RoPE and the
  q/k RMSNorms; see ``pixelflow/layers.py``) stay fp32, as in the published model code.
- The velocity the model returns is bf16, so the guidance mix ``v_u + w (v_c - v_u)`` is formed
  in bf16, as in the published code.
- fp32 matmuls outside autocast (the conditioning MLPs) use TF32 on Ampere and newer GPUs.

``fp32`` is IEEE fp32 on every device: TF32 off (a training run turns it on for the whole process) and no
enclosing autocast (:func:`strict_fp32`).

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

__all__ = ["PRECISIONS", "as_dtype", "resolve_precision", "sampling_precision", "strict_fp32"]

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
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and cuDNN convolutions on or off in the enclosed code; both switches restored on exit.

    Matmuls go through ``torch.set_float32_matmul_precision`` alone ("high" is TF32, "highest" IEEE fp32), the
    call the training launch and the benchmark make: writing ``torch.backends.cuda.matmul.allow_tf32`` after it
    mixes torch's two TF32 interfaces, and torch (2.9 and later) then refuses to read the precision back."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@contextmanager
def strict_fp32() -> Iterator[None]:
    """IEEE fp32 arithmetic in the enclosed code, whatever the process set before: TF32 off for matmuls and cuDNN
    convolutions, and an enclosing autocast (CPU or CUDA) switched off; all restored on exit, also after an error.

    A training run sets TF32 on (``torch.set_float32_matmul_precision("high")``); code that must compute exactly
    what it computes alone (the fp32 sampling path, reference features) runs inside this."""
    with _tf32(False), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


@contextmanager
def sampling_precision(precision: str, device: torch.device | str) -> Iterator[str]:
    """Run the enclosed sampling in ``precision`` on ``device``; yields the resolved name.

    fp32 is :func:`strict_fp32`; bf16 is autocast with TF32 on. The TF32 switches are restored on exit, so
    training or other code in the process is unaffected.
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        with strict_fp32():
            yield resolved
        return
    with _tf32(True), torch.autocast(device.type, dtype=torch.bfloat16):
        yield resolved
