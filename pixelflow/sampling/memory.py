"""Peak device memory of sampling, from calibrated accounting; refuses batches that will not fit.

Method (the training estimate's, ``scripts/estimate_memory.py``; bytes, P = parameters, L = depth,
D = width, X = rows x tokens of the largest forward: the last stage, 2B rows with guidance):

    peak = 4P weights (fp32)
         + F(L, X)  forward high-water of one guided velocity call above the weights:
                    (c0 + c1 L) D^2 + (a0 + a1 L) D X   (autocast's cached bf16 weight copies; one
                    block's working set per token, activations are not kept under no_grad)
         + M(steps)  the adaLN vectors the sampler holds: a fixed-grid method (Euler, Heun, AB2) computes
                    every step's for a whole stage at once, (m_b L + m_h) D bytes per row per step (fp32);
                    Dopri5 computes one call's at a time (its steps are adaptive)
         + k x latent bytes (fp32, 3 channels at the final size) held by the integrator and the
                    pre-drawn noise: Euler/Heun keep a few B-row latents, Dopri5 its 2B-row stages.

F + M is taken at the stage where it is largest: the last one when every stage has the same steps, since
a stage's vectors are freed before the next stage computes its own.

Text-to-image models (``cross_attention_dim`` D_t, text length T, default the published 512) add

         + w L (2 D^2 + 2 D_t D)   autocast's cached bf16 copies of each block's cross-attention
                    weights (q, k, v, o); w bytes per weight
         + 2B T (4 D_t + 8)        the [uncond; cond] text states (fp32) and masks (int64), held all run
         + E                       the text encoder on the same device (weights and its prompt cache),
                    passed in by the caller (:meth:`pixelflow.text.TextEncoder.device_bytes`).
The text's own working set (a block's K/V over T tokens) stays below the image tokens' at the last
stage, so it sets no peak; the one-off T5 encoding before sampling is a smaller, earlier peak.

The coefficients below are fitted by ``python scripts/estimate_memory.py --sampling`` from
instrumented CPU forwards of XL/4 width at depth 1 and 2 (live-tensor bytes, the CPU analogue of
``torch.cuda.max_memory_allocated``); w from T2I-XL/4-width forwards at depth 2 and 3 (``--text``);
the state factors k from full tiny-model sampling runs. The budget adds the CUDA context and
allocator slack, as the training estimate does. Estimates, not measurements: ``scripts/gpu_check.sh``
measures them on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK", "FORWARD_COEFFICIENTS", "STATE_LATENTS", "TEXT_WEIGHT_COPY_BYTES",
           "TEXT_LENGTH", "MODULATION_BYTES", "PUBLISHED_STEPS", "modulation_bytes", "sampling_peak_bytes",
           "sampling_budget_bytes", "max_fitting_batch", "check_sampling_fits"]

GIB = 2**30
# Outside the allocator's count: CUDA context + kernels (~0.5-0.6 GiB with torch 2.x) and the caching
# allocator's fragmentation (reserved above allocated, typically 5-10%).
CUDA_CONTEXT_BYTES = 0.6 * GIB
ALLOCATOR_SLACK = 0.10

# (c0, c1, a0, a1) of F = (c0 + c1 L) D^2 + (a0 + a1 L) D X, per precision, fitted on CPU by
# `python scripts/estimate_memory.py --sampling --calibrate` (XL/4 width, depth 2 and 3, 64 px, batch 1 and 2).
# bf16: c1 = 24 bytes per D^2 per block are the cached bf16 copies of a block's 12 D^2 weights (its adaLN
# stays fp32); a0 = 22 bytes per D per token is the working set of one block (MLP hidden 4D in bf16 ...).
FORWARD_COEFFICIENTS: dict[str, tuple[float, float, float, float]] = {
    "fp32": (0.667, -0.222, 47.53, 0.25),
    "bf16": (4.98, 24.02, 22.28, 0.0),
}
# Full-size fp32 latents of B rows held besides the forward: the pre-drawn noise (~1.3 latents, doubled
# for Dopri5), the state and its update (Heun: + its predictor); Dopri5 holds 2B-row tensors: y0, seven
# stages, y1, the error estimate, interpolation coefficients and torchdiffeq's temporaries. Read off
# whole Test/2 runs (64 px, batch 8: measured peak minus weights and forward, per latent); heun counted.
STATE_LATENTS = {"euler": 5.0, "heun": 7.0, "dopri5": 56.0}
# w: bytes per cross-attention weight per block, fitted by `python scripts/estimate_memory.py --sampling --text`
# (T2I-XL/4 width, depth 2 and 3, 64 px, 64 text tokens): bf16 2.000 (autocast's bf16 copies), fp32 -4e-5 (none).
TEXT_WEIGHT_COPY_BYTES = {"fp32": 0.0, "bf16": 2.0}
TEXT_LENGTH = 512  # published prompt length (tokens)
# (m_b, m_h): bytes per D per row and step of the adaLN vectors, fp32 in every precision. A block keeps its
# six factors' (rows, 6D) linear output (they are views of it) and the two it forms from it, 1 + scale and
# (1 + scale) x the MLP norm's weight: 8D floats. The head keeps its (rows, 2D) output and 1 + scale: 3D.
MODULATION_BYTES = (32, 12)
PUBLISHED_STEPS = 30  # Euler steps a stage of the published sampler


def modulation_bytes(model: torch.nn.Module, rows: int, steps: int) -> float:
    """Bytes of the adaLN vectors of ``steps`` network calls on ``rows`` rows each (one stage's, fixed grid)."""
    per_block, head = MODULATION_BYTES
    return steps * rows * model.hidden_size * (per_block * len(model.transformer_blocks) + head)


def _stage_steps(method: str, steps: int | Sequence[int], image_size: int) -> list[int]:
    """Calls whose vectors a stage holds at once, per stage (one int: the same for every stage, so the last
    stage, the largest, stands for all): a fixed-grid stage's steps, Dopri5 one call."""
    per_stage = [steps] if isinstance(steps, int) else list(steps)
    if not per_stage or any(not isinstance(k, int) or k < 1 for k in per_stage):
        raise ValueError(f"steps must be a positive int or one positive int per stage, got {steps!r}")
    if image_size % 2 ** (len(per_stage) - 1):
        raise ValueError(f"steps {steps!r} gives {len(per_stage)} stages, but image_size {image_size} is not divisible "
                         f"by 2**{len(per_stage) - 1}: pass one step count per stage of the sampler's schedule")
    return [1] * len(per_stage) if method == "dopri5" else per_stage


def _text_bytes(model: torch.nn.Module, batch: int, precision: str, text_length: int) -> float:
    """A text-to-image model's extra bytes (module docstring): cross-attention weight copies and the text states."""
    text_width = model.cross_attention_dim
    if not text_width:
        return 0.0
    depth, width = len(model.transformer_blocks), model.hidden_size
    copies = TEXT_WEIGHT_COPY_BYTES[precision] * depth * (2 * width**2 + 2 * text_width * width)
    return copies + 2 * batch * text_length * (4 * text_width + 8)


def sampling_peak_bytes(model: torch.nn.Module, image_size: int, batch: int, method: str, precision: str,
                        guided: bool = True, coefficients: dict | None = None, state: dict | None = None,
                        text_length: int = TEXT_LENGTH, encoder_bytes: float = 0.0, *,
                        steps: int | Sequence[int] = PUBLISHED_STEPS) -> float:
    """Estimated peak allocated bytes of sampling ``batch`` images with ``model`` (any device, even meta).

    ``steps``: the sampler's steps a stage (:attr:`SamplerConfig.steps`, an int or one per stage; the default is
    the published 30, so callers that sample with other steps pass theirs; Dopri5 ignores it). Text-to-image:
    ``text_length`` tokens per prompt; ``encoder_bytes`` of a text encoder on the same device."""
    if precision not in FORWARD_COEFFICIENTS:
        raise ValueError(f"precision must be a resolved one of {tuple(FORWARD_COEFFICIENTS)}, got {precision!r}")
    c0, c1, a0, a1 = (coefficients or FORWARD_COEFFICIENTS)[precision]
    params = sum(p.numel() for p in model.parameters())
    depth, width = len(model.transformer_blocks), model.hidden_size
    rows = batch * (2 if guided or method == "dopri5" else 1)
    per_stage = _stage_steps(method, steps, image_size)

    def stage_bytes(stage: int, calls: int) -> float:
        x = rows * (image_size // 2 ** (len(per_stage) - 1 - stage) // model.patch_size) ** 2
        forward = (c0 + c1 * depth) * width**2 + (a0 + a1 * depth) * width * x
        return forward + modulation_bytes(model, rows, calls)

    held = max(stage_bytes(stage, calls) for stage, calls in enumerate(per_stage))
    latent = batch * model.in_channels * image_size**2 * 4
    text = _text_bytes(model, batch, precision, text_length) + encoder_bytes
    return 4 * params + held + (state or STATE_LATENTS)[method] * latent + text


def sampling_budget_bytes(peak: float) -> float:
    """Device memory to reserve for an allocated peak: allocator slack plus the CUDA context."""
    return peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES


def max_fitting_batch(model: torch.nn.Module, image_size: int, method: str, precision: str, device_bytes: float,
                      guided: bool = True, text_length: int = TEXT_LENGTH, encoder_bytes: float = 0.0, *,
                      steps: int | Sequence[int] = PUBLISHED_STEPS) -> int:
    """Largest batch whose budget fits ``device_bytes`` (0 if not even one image fits)."""
    def fits(b: int) -> bool:
        peak = sampling_peak_bytes(model, image_size, b, method, precision, guided, text_length=text_length,
                                   encoder_bytes=encoder_bytes, steps=steps)
        return sampling_budget_bytes(peak) <= device_bytes

    lo, hi = 0, 1  # fits(lo) (or lo = 0), and the search ends at the first hi that does not fit
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_sampling_fits(model: torch.nn.Module, image_size: int, batch: int, method: str, precision: str,
                        device_bytes: float, guided: bool = True, text_length: int = TEXT_LENGTH,
                        encoder_bytes: float = 0.0, *, steps: int | Sequence[int] = PUBLISHED_STEPS) -> float:
    """Raise ValueError, naming the batch that fits, if ``batch`` will not fit ``device_bytes``; return the budget.
    ``steps`` as for :func:`sampling_peak_bytes`."""
    text = dict(text_length=text_length, encoder_bytes=encoder_bytes, steps=steps)
    budget = sampling_budget_bytes(sampling_peak_bytes(model, image_size, batch, method, precision, guided, **text))
    if budget > device_bytes:
        best = max_fitting_batch(model, image_size, method, precision, device_bytes, guided, **text)
        fix = f"use batch_size={best}" if best else "no batch fits; use a larger device"
        if precision == "fp32" and best < batch:
            fix += " (or precision=bf16, which needs less)"
        raise ValueError(f"batch_size={batch} at {image_size} px ({method}, {precision}) needs an estimated "
                         f"{budget / GIB:.1f} GiB but the device has {device_bytes / GIB:.1f} GiB: {fix}")
    return budget
