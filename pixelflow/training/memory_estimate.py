"""Peak training memory of a recipe on a GPU we do not have, by calibrated accounting (``scripts/estimate_memory.py``).

Method (bytes; P = parameter count, L = depth):

- static S = 4P weights + 8P AdamW moments + 4P EMA copy (fp32) = 16P, plus the input batch; exact.
- per step, on top of S, where the stage mix enters through T = tokens of the micro-batch's
  per-stage sub-batches (every sample at its own stage's size, no padding):
    forward high-water  F + 4P  (saved activations + autocast's bf16 weight copies + one op's output, and
                        the gradients of the micro-batch before: Lightning zeroes them only after the
                        next training_step's forward, and accumulation keeps them by design)
    kept for backward   R   (saved activations; with checkpointing only block inputs)
    backward            B = R + 4P + W  (bound: all that is kept, every gradient, and the working set
                        W of one block, a line in T_last = tokens of the full-size stage's sub-batch)
    optimizer step      k_opt * 4P   (gradients + foreach temporaries; measured ratio)
  F and R have the form (c0 + c1 L) + (a0 + a1 L) T: a constant, a per-block constant (autocast's
  weight copies), per-token bytes outside the blocks and per-token bytes per block. All
  coefficients come from four instrumented training steps of the same width on CPU (depth
  L = 1, 2 x micro-batch 4, 8, i.e. one and two samples per stage; at 128 px by default, since
  bf16 is slow on CPU: every term is linear in tokens, so 256 px is reached through T), where
  :class:`TensorMemoryTracker` counts live tensor bytes (the CPU analogue of
  torch.cuda.max_memory_allocated). CPU and CUDA autocast cast the same ops and both run flash
  attention (memory linear in tokens), so the per-token bytes carry over to a GPU.
    sample grid        G + 4P  the SampleGrid callback's bf16 sampling of one chunk (pixelflow.sampling.memory,
                        at its steps) after an optimizer step, with that step's gradients still held
                        (zeroed after the next forward, as above)
- peak = S + max(F + 4P, B, k_opt 4P, G + 4P); the budget adds the CUDA context and allocator slack.
- ``--ddp``: DDP adds 4P to S: its gradient buckets (``bucket_cap_mb`` 25, the torch and Lightning default,
  only sets how the gradients are split) are allocated when the model is wrapped and hold a flat copy
  of every gradient beside ``param.grad``, as DDP's default ``gradient_as_bucket_view=False`` keeps them
  apart (with True the gradients would be views into the buckets and this term would vanish).

Sampling (``--sampling``): pixelflow/sampling/memory.py's model (the refusal in sample.py uses it),
per batch, method and precision; ``--calibrate`` refits its coefficients by the same instrumented
CPU forwards (XL/4 width, depth 2 and 3) and checks it against whole Test/2 sampling runs. A T2I
model (``--model T2I-XL/4 --image-size 1024``) counts its 512-token text states and Flan-T5-XL's
encoder on the same device (weights in the sampling precision plus a full prompt cache; sizes from
its published config, built on the meta device); ``--text`` refits the cross-attention term.

``--validate`` runs the same calibration on a small model, predicts its full depth at twice the
image size and a larger micro-batch, and compares with a measured step.
"""

from __future__ import annotations

import torch

from pixelflow.benchmarking import stage_tokens, training_autocast
from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import ClassCondition
from pixelflow.model import PIXELFLOW_CONFIGS, build_model
from pixelflow.precision import sampling_precision
from pixelflow.profiling import TensorMemoryTracker
from pixelflow.sampling.memory import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    FORWARD_COEFFICIENTS,
    GIB,
    PUBLISHED_STEPS,
    TEXT_LENGTH,
    sampling_budget_bytes,
    sampling_peak_bytes,
)
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition
from pixelflow.training.objective import cascade_loss


def tokens(image_size: int, micro_batch: int, patch: int, num_stages: int = 4) -> tuple[int, int]:
    """(T, T_last): tokens of one micro-batch with balanced stages (each sample at its stage's size),
    and of its full-size stage's sub-batch."""
    total = stage_tokens(CascadeSchedule(image_size=image_size, num_stages=num_stages), patch, micro_batch)[0]
    return total, len(range(num_stages - 1, micro_batch, num_stages)) * (image_size // patch) ** 2


def param_count(model: str, num_classes: int = 1000) -> int:
    with torch.device("meta"):
        net = build_model(model, num_classes=num_classes)
    return sum(p.numel() for p in net.parameters())


def measure(model: str, depth: int, image_size: int, micro_batch: int, precision: str, ckpt: bool, ema: bool,
            num_classes: int = 1000) -> dict:
    """One instrumented optimizer step on CPU: static bytes and the per-phase high-water marks above them."""
    torch.manual_seed(0)
    net = build_model(model, num_classes=num_classes, depth=depth, gradient_checkpointing=ckpt).train()
    params = list(net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # the CUDA default; CPU would default to a loop
    for p in params:  # create the AdamW moments without a real step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_copy = [p.detach().clone() for p in params] if ema else []
    schedule = CascadeSchedule(image_size=image_size)
    images = torch.rand(micro_batch, 3, image_size, image_size) * 2 - 1
    labels = torch.randint(0, num_classes, (micro_batch,))
    tracker = TensorMemoryTracker()
    tracker.track(*params, *ema_copy, *[t for s in optimizer.state.values() for t in s.values()], images, labels)
    static = tracker.current
    out = {"depth": depth, "micro_batch": micro_batch, "image_size": image_size, "P": sum(p.numel() for p in params),
           "static": static}
    with tracker:
        with training_autocast(torch.device("cpu"), precision):
            loss, _ = cascade_loss(net, schedule, images, labels, torch.Generator().manual_seed(0))
        out["forward"] = tracker.peak - static
        out["retained"] = tracker.current - static
        tracker.reset_peak()
        loss.backward()
        out["backward"] = tracker.peak - static
        del loss
        tracker.reset_peak()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        for e, p in zip(ema_copy, params):
            e.lerp_(p.detach(), 1 - 0.9999)
        out["optimizer"] = tracker.peak - static
    out["T"], out["T_last"] = tokens(image_size, micro_batch, net.patch_size)
    return out


def _solve(rows: list[tuple[float, float]], values: list[float]) -> list[float]:
    """Coefficients (c0, c1, a0, a1) of v = c0 + c1 L + (a0 + a1 L) X through four (L, X) points."""
    a = torch.tensor([[1.0, L, X, L * X] for L, X in rows], dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(values, dtype=torch.float64)).tolist()


def _line(xs: list[float], ys: list[float]) -> list[float]:
    """Least-squares (w0, w1) of y = w0 + w1 x."""
    a = torch.tensor([[1.0, x] for x in xs], dtype=torch.float64)
    return torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution.flatten().tolist()


def measure_runs(model: str, precision: str, ckpt: bool, ema: bool, image_size: int, batches: tuple[int, int] = (4, 8),
                 num_classes: int = 1000) -> list[dict]:
    """The four calibration steps: depth 1, 2 x two micro-batches."""
    return [measure(model, d, image_size, b, precision, ckpt, ema, num_classes) for d in (1, 2) for b in batches]


def fit(runs: list[dict]) -> dict:
    """F and R: exact bilinear fits in (L, T). W: backward high-water minus R minus all gradients, a line in
    T_last (one block at a time, so no L term). k_opt: optimizer-step high-water over 4P."""
    points = [(r["depth"], r["T"]) for r in runs]
    return {
        "forward": _solve(points, [r["forward"] for r in runs]),
        "retained": _solve(points, [r["retained"] for r in runs]),
        "working_set": _line([r["T_last"] for r in runs], [r["backward"] - r["retained"] - 4 * r["P"] for r in runs]),
        "k_opt": max(r["optimizer"] / (4 * r["P"]) for r in runs),
    }


def _eval(c: list[float], depth: int, x: int) -> float:
    return c[0] + c[1] * depth + (c[2] + c[3] * depth) * x


def predict(cal: dict, model: str, image_size: int, micro_batch: int, ema: bool, num_classes: int = 1000,
            grid_chunk: int | None = 16, grid_steps: int = 10, ddp: bool = False, gradients_kept: bool = True) -> dict:
    """Peak bytes of one optimizer step of ``model`` at full depth from the fitted coefficients ``cal``.

    ``grid_chunk`` / ``grid_steps``: the SampleGrid callback's chunk_size and steps (conf/callbacks/default.yaml);
    ``ddp``: count DDP's gradient buckets; ``gradients_kept``: the forward runs with the gradients of the
    micro-batch before still held (every step but a run's first; False for comparing with :func:`measure`)."""
    depth, patch = PIXELFLOW_CONFIGS[model]["depth"], PIXELFLOW_CONFIGS[model]["patch_size"]
    p = param_count(model, num_classes=num_classes)
    total, last = tokens(image_size, micro_batch, patch)
    # weights, AdamW moments (+ EMA), DDP's gradient buckets, and the fp32 input batch
    static = (12 + (4 if ema else 0) + (4 if ddp else 0)) * p + micro_batch * 3 * image_size**2 * 4
    kept = 4 * p if gradients_kept else 0.0
    fwd, retained = _eval(cal["forward"], depth, total) + kept, _eval(cal["retained"], depth, total)
    # Bound: everything kept for backward, every gradient, and one block's working set at once.
    bwd = retained + 4 * p + cal["working_set"][0] + cal["working_set"][1] * last
    opt = cal["k_opt"] * 4 * p
    # The SampleGrid callback after an optimizer step: bf16 Euler + CFG on grid_chunk images. The sampling model's
    # 4P for the weights (already in S) stands for the 4P of the step's gradients, still held.
    with torch.device("meta"):
        net = build_model(model, num_classes=num_classes)
    grid = sampling_peak_bytes(net, image_size, grid_chunk, "euler", "bf16", steps=grid_steps) if grid_chunk else 0.0
    phases = {"forward": fwd, "backward": bwd, "optimizer": opt, "sample_grid": grid}
    peak = static + max(phases.values())
    return {"params": p, "tokens": total, "tokens_last_stage": last, "static": static, "forward": fwd,
            "retained": retained, "backward": bwd, "optimizer": opt, "sample_grid": grid, "peak_allocated": peak,
            "phase_at_peak": max(phases, key=phases.get),
            "budget": peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES}


BYTE_KEYS = ("static", "forward", "retained", "backward", "optimizer", "sample_grid", "peak_allocated", "budget")


def gib(report: dict) -> dict:
    """The byte-valued entries of a :func:`predict` report in GiB."""
    return {k: round(v / GIB, 3) if k in BYTE_KEYS else v for k, v in report.items()}


def validate(model: str, precision: str, ckpt: bool, ema: bool, micro_batches: list[int], num_classes: int = 10) -> list[dict]:
    """Calibrate ``model`` (depths 1-2, stage grids 2..16); predict its full depth at twice the image
    size (grids 4..32) for each micro-batch; compare each with a measured step."""
    small = 16 * PIXELFLOW_CONFIGS[model]["patch_size"]
    image_size, depth = 2 * small, PIXELFLOW_CONFIGS[model]["depth"]
    cal = fit(measure_runs(model, precision, ckpt, ema, small, num_classes=num_classes))
    checks = []
    for micro_batch in micro_batches:
        # a run's first step (measure() starts without gradients), no grid
        predicted = predict(cal, model, image_size, micro_batch, ema, num_classes, grid_chunk=None, gradients_kept=False)
        measured = measure(model, depth, image_size, micro_batch, precision, ckpt, ema, num_classes)
        actual = measured["static"] + max(measured["forward"], measured["backward"], measured["optimizer"])
        checks.append({
            "model": model, "image_size": image_size, "precision": precision, "gradient_checkpointing": ckpt,
            "micro_batch": micro_batch, "predicted_peak_bytes": round(predicted["peak_allocated"]),
            "measured_peak_bytes": actual, "relative_error": predicted["peak_allocated"] / actual - 1,
            "predicted_phase": predicted["phase_at_peak"],
            **{f"{phase}_predicted_vs_measured": [round(predicted[phase]), measured[phase]]
               for phase in ("forward", "retained", "backward")}})
    return checks


# ---- sampling: the coefficients of pixelflow.sampling.memory --------------------------------------------
def measure_sampling_forward(model: str, depth: int, image_size: int, batch: int, precision: str,
                             num_classes: int = 1000) -> dict:
    """One guided velocity call at the full size on CPU (no_grad): its high-water above the weights."""
    torch.manual_seed(0)
    net = build_model(model, num_classes=num_classes, depth=depth).eval()
    sampler = CascadeSampler(net, CascadeSchedule(image_size=image_size), SamplerConfig(guidance_scale=2.0))
    x, labels = torch.randn(batch, 3, image_size, image_size), torch.zeros(batch, dtype=torch.long)
    tracker = TensorMemoryTracker()
    tracker.track(*net.parameters(), x, labels)
    static = tracker.current
    with torch.no_grad(), tracker, sampling_precision(precision, "cpu"):
        sampler.velocity(x, torch.tensor([900.0]), ClassCondition(labels, net.null_class), 2.0)
    return {"depth": depth, "width": net.hidden_size, "precision": precision,
            "X": 2 * batch * (image_size // net.patch_size) ** 2, "forward": tracker.peak - static}


def fit_sampling(model: str, precision: str, image_size: int = 64, batches: tuple[int, int] = (1, 2),
                 num_classes: int = 1000) -> tuple[list, list]:
    """(c0, c1, a0, a1) of F = (c0 + c1 L) D^2 + (a0 + a1 L) D X from depth 2, 3 x two batches; and the runs.

    Depth 1 is left out: its single block reads the embedded tokens, so one hidden state fewer is live."""
    runs = [measure_sampling_forward(model, d, image_size, b, precision, num_classes) for d in (2, 3) for b in batches]
    width = runs[0]["width"]
    c = _solve([(r["depth"], r["X"]) for r in runs], [r["forward"] for r in runs])
    return [c[0] / width**2, c[1] / width**2, c[2] / width, c[3] / width], runs


def measure_sampling_run(model: str, image_size: int, batch: int, method: str, precision: str,
                         coefficients: dict | None = None) -> dict:
    """Peak live bytes of a whole sampling run (noise, integrator, guided forwards) vs the library's estimate
    (with ``coefficients`` fitted for this model's width; default: the library's, fitted at XL/4's)."""
    torch.manual_seed(0)
    net = build_model(model, num_classes=10).eval()
    with torch.no_grad():
        for p in net.parameters():  # the published init zeroes the output: a random net exercises the integrator
            p.normal_(0, 0.05)
    schedule = CascadeSchedule(image_size=image_size)
    sampler = CascadeSampler(net, schedule, SamplerConfig(method=method, steps=2, guidance_scale=2.0))
    labels = torch.arange(batch) % 10
    tracker = TensorMemoryTracker()
    tracker.track(*net.parameters(), labels)
    with torch.no_grad(), tracker, sampling_precision(precision, "cpu"):
        noise = CascadeNoise.draw(schedule, batch, 3, method == "dopri5", torch.Generator().manual_seed(0))
        sampler.sample(labels, noise=noise)
    predicted = sampling_peak_bytes(net, image_size, batch, method, precision, coefficients=coefficients, steps=2)
    return {"model": model, "image_size": image_size, "batch": batch, "method": method, "precision": precision,
            "measured_peak_bytes": tracker.peak, "predicted_peak_bytes": round(predicted),
            "relative_error": predicted / tracker.peak - 1}


def validate_sampling(model: str = "Test/2", methods: tuple[str, ...] = ("euler", "dopri5")) -> list[dict]:
    """Calibrate ``model``'s width at 32 px, predict whole runs at 64 px and batch 4 (the state factors were
    read off batch 8) and measure them."""
    coefficients = {p: fit_sampling(model, p, image_size=32, num_classes=10)[0] for p in ("fp32", "bf16")}
    return [measure_sampling_run(model, 64, 4, m, p, coefficients) for m in methods for p in ("fp32", "bf16")]


def measure_text_forward(depth: int, precision: str, image_size: int = 64, text_length: int = 64) -> dict:
    """One guided T2I-XL/4-width velocity call on CPU: its high-water above the weights and text, and what the
    class-to-image forward model predicts for the same width, depth and tokens (the rest is the text's)."""
    torch.manual_seed(0)
    net = build_model("T2I-XL/4", depth=depth).eval()
    sampler = CascadeSampler(net, CascadeSchedule(image_size=image_size), SamplerConfig(guidance_scale=2.0))
    x = torch.randn(1, 3, image_size, image_size)
    text = TextCondition(torch.randn(2, text_length, net.cross_attention_dim), torch.ones(2, text_length, dtype=torch.long))
    tracker = TensorMemoryTracker()
    tracker.track(*net.parameters(), x, text.states, text.mask)
    static = tracker.current
    with torch.no_grad(), tracker, sampling_precision(precision, "cpu"):
        sampler.velocity(x, torch.tensor([900.0]), text, 2.0)
    c0, c1, a0, a1 = FORWARD_COEFFICIENTS[precision]
    width, tokens = net.hidden_size, 2 * (image_size // net.patch_size) ** 2
    c2i = (c0 + c1 * depth) * width**2 + (a0 + a1 * depth) * width * tokens
    return {"depth": depth, "precision": precision, "forward": tracker.peak - static, "c2i_model": round(c2i),
            "cross_attention_weights_per_block": 2 * width**2 + 2 * net.cross_attention_dim * width}


def fit_text(precision: str) -> dict:
    """w of pixelflow.sampling.memory: the extra forward bytes per added block per cross-attention weight."""
    runs = [measure_text_forward(d, precision) for d in (2, 3)]
    extra = [r["forward"] - r["c2i_model"] for r in runs]
    return {"w": (extra[1] - extra[0]) / runs[0]["cross_attention_weights_per_block"], "runs": runs}


def flan_t5_xl_bytes(dtype_bytes: int, cache_size: int = 256, max_length: int = TEXT_LENGTH) -> float:
    """Flan-T5-XL's encoder (published config: d_model 2048, d_ff 5120, 24 layers, 32 heads of 64, 32128 tokens,
    gated GELU) in ``dtype_bytes`` per weight, plus a full prompt cache, as TextEncoder.device_bytes counts them."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        params = sum(p.numel() for p in T5EncoderModel(config).parameters())
    return params * dtype_bytes + cache_size * max_length * (config.d_model * dtype_bytes + 8)


def sampling_estimates(model: str, image_size: int, batches: list[int], methods: list[str],
                       encoder_on_device: bool = True, steps: int = PUBLISHED_STEPS) -> list[dict]:
    """Peak and budget (GiB) of sampling ``model`` per batch, method and precision, from the library's model
    (a T2I model: 512-token text and, if ``encoder_on_device``, Flan-T5-XL's encoder in the same precision);
    ``steps`` a stage for the fixed-grid methods."""
    text = model.startswith("T2I")
    with torch.device("meta"):
        net = build_model(model) if text else build_model(model, num_classes=1000)
    rows = []
    for precision in ("bf16", "fp32"):
        encoder = flan_t5_xl_bytes(2 if precision == "bf16" else 4) if text and encoder_on_device else 0.0
        for method in methods:
            for batch in batches:
                peak = sampling_peak_bytes(net, image_size, batch, method, precision, encoder_bytes=encoder, steps=steps)
                budget = sampling_budget_bytes(peak)
                rows.append({"precision": precision, "method": method, "batch": batch, "peak_allocated": round(peak / GIB, 2),
                             **({"text_encoder": round(encoder / GIB, 2)} if text else {}),
                             "budget": round(budget / GIB, 2),
                             **{f"fits_{g}gb": budget <= g * 1e9 for g in (24, 40, 80)}})
    return rows
