"""Throughput and memory of one training recipe and of sampling; prints one JSON object.

    python scripts/benchmark.py                                   # Tiny/4, 32 px, CPU
    python scripts/benchmark.py --model XL/4 --micro-batch 32 --precision bf16-mixed --device cuda
    python scripts/benchmark.py --model XL/4 --device meta        # FLOPs only (no memory, no GPU)
    python scripts/benchmark.py --sampling --model XL/4 --device cuda --sample-batch 16 --sample-steps 30 --out s.json

Training: AdamW (foreach on CUDA), gradient clipping 1.0, EMA every step, ``--accumulation``
micro-batches per optimizer step, the real ``cascade_loss`` (every stage at its own size, packed in one pass) on random
images. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the high-water mark of
live tensor bytes seen by :class:`TensorMemoryTracker` over one extra step (the same quantity,
counted by a dispatch mode because CPU has no allocator statistics). FLOPs per image come from
``torch.utils.flop_counter.FlopCounterMode`` (fwd + bwd of one micro-batch); MFU is reported
where a CUDA device is present. ``padding`` compares that unpadded loss (keys ``*_sub_batches``) with one padded
batch at the full size: tokens, FLOPs and (except on meta) measured time of forward + backward.

``--sampling`` measures sampling only: seconds and model calls per image of every method in ``--methods``
at the given size, batch, steps, CFG, precision and ``--compile`` setting (compile time reported apart,
as ``compile_seconds``). Model calls are network rows counted as they run
(:class:`pixelflow.sampling.call_counter.CallCounter`: 2 per guided call, 1 where the guidance weight is 1, every
adaptive Dopri5 step). Dopri5's step count depends on the weights: without ``--ckpt`` the network has
its initial weights (zeroed output layer, velocity 0), so pass ``--ckpt`` for a trained model's counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelflow.cascade import CascadeSchedule  # noqa: E402
from pixelflow.checkpoint import load_pixelflow  # noqa: E402
from pixelflow.host_memory import keep_freed_memory  # noqa: E402
from pixelflow.model import PixelFlowTransformer, build_model  # noqa: E402
from pixelflow.precision import PRECISIONS, resolve_precision, sampling_precision  # noqa: E402
from pixelflow.sampling.call_counter import CallCounter  # noqa: E402
from pixelflow.sampling.compile import compile_for_sampling, sampling_shapes  # noqa: E402
from pixelflow.sampling.samplers import METHODS, CascadeSampler, SamplerConfig  # noqa: E402
from pixelflow.training.objective import cascade_loss  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) used for MFU; override with --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "L4": 121.0,
                    "A10": 125.0}


class TensorMemoryTracker(TorchDispatchMode):
    """Live-tensor bytes and their high-water mark on CPU: every op output's storage is counted
    until it is freed (a weakref callback). Tensors made outside the mode are added with :meth:`track`."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[int, weakref.ref]] = {}

    def track(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._live:
                continue
            self._live[key] = (size, weakref.ref(storage, lambda _, k=key: self._free(k)))
            self.current += size
            self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key, (0, None))
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


def default_image_size(name: str) -> int:
    return 32 if name.split("/")[0] in ("Tiny", "Test") else 256


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed" and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Recipe:
    """Model, schedule, AdamW, EMA and one optimizer step of ``accumulation`` micro-batches."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        with torch.device(device):
            self.model = build_model(args.model, num_classes=args.num_classes,
                                     gradient_checkpointing=args.grad_checkpointing).train()
        self.schedule = CascadeSchedule(image_size=args.image_size, num_stages=args.num_stages)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9999)) if args.ema else None
        self.generator = torch.Generator(device if device.type != "meta" else "cpu").manual_seed(0)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.args, self.device
        images = torch.rand(a.micro_batch, 3, a.image_size, a.image_size, device=d) * 2 - 1
        return images, torch.randint(0, a.num_classes, (a.micro_batch,), device=d)

    def loss(self) -> torch.Tensor:
        if self.device.type == "meta":
            return self.meta_loss()
        images, labels = self.batch()
        with autocast(self.device, self.args.precision):
            loss, _ = cascade_loss(self.model, self.schedule, images, labels, self.generator, label_dropout=0.1)
        return loss

    def meta_loss(self) -> torch.Tensor:
        """cascade_loss's packed pass over balanced stages without its data-dependent indexing, for FLOP counts."""
        counts = torch.bincount(torch.arange(self.args.micro_batch) % self.schedule.num_stages).tolist()
        present = [(n, side) for n, side in zip(counts, self.schedule.stage_sides) if n]
        xs = [torch.zeros(n, 3, side, side, device=self.device) for n, side in present]
        ts = [torch.zeros(n, device=self.device) for n, _ in present]
        labels = torch.zeros(sum(n for n, _ in present), dtype=torch.long, device=self.device)
        preds = self.model(xs, ts, labels)
        return torch.cat([(pred - x).square().mean(dim=(1, 2, 3)) for pred, x in zip(preds, xs)]).mean()

    def step(self) -> None:
        for _ in range(self.args.accumulation):
            (self.loss() / self.args.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (after one untimed warm-up call)."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def stage_tokens(schedule: CascadeSchedule, patch: int, batch: int) -> tuple[int, int]:
    """(tokens with per-stage sub-batches, tokens if every sample were padded to the full size)."""
    counts = torch.bincount(torch.arange(batch) % schedule.num_stages, minlength=schedule.num_stages).tolist()
    sub = sum(n * (side // patch) ** 2 for n, side in zip(counts, schedule.stage_sides))
    return sub, batch * (schedule.image_size // patch) ** 2


def padded_loss(recipe: Recipe) -> torch.Tensor:
    """The padded alternative's cost: every sample through the network at the full size."""
    images, labels = recipe.batch()
    t = torch.rand(images.shape[0], device=images.device) * 999
    with autocast(recipe.device, recipe.args.precision):
        return F.mse_loss(recipe.model(images, t, labels).float(), images)


def padding_report(recipe: Recipe) -> dict:
    model, args = recipe.model, recipe.args
    sub_tokens, pad_tokens = stage_tokens(recipe.schedule, model.patch_size, args.micro_batch)
    report = {"micro_batch": args.micro_batch, "tokens_sub_batches": sub_tokens, "tokens_padded": pad_tokens,
              "token_ratio_padded_over_sub": pad_tokens / sub_tokens,
              "flops_sub_batches": count_flops(lambda: recipe.loss().backward()),
              "flops_padded": count_flops(lambda: padded_loss(recipe).backward())}
    report["flop_ratio_padded_over_sub"] = report["flops_padded"] / report["flops_sub_batches"]
    model.zero_grad(set_to_none=True)
    if recipe.device.type != "meta":
        repeats = max(args.steps, 1)
        report["seconds_sub_batches"] = timed(lambda: recipe.loss().backward(), recipe.device, repeats)
        report["seconds_padded"] = timed(lambda: padded_loss(recipe).backward(), recipe.device, repeats)
        report["time_ratio_padded_over_sub"] = report["seconds_padded"] / report["seconds_sub_batches"]
        model.zero_grad(set_to_none=True)
    return report


def peak_memory(recipe: Recipe) -> tuple[int, str]:
    """Peak bytes of one optimizer step (after a warm-up step, so AdamW state exists)."""
    device = recipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        recipe.step()
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    tracker = TensorMemoryTracker()
    tracker.track(*recipe.model.parameters(), *recipe.model.buffers())
    tracker.track(*[t for state in recipe.optimizer.state.values() for t in state.values()])
    if recipe.ema is not None:
        tracker.track(*recipe.ema.parameters(), *recipe.ema.buffers())
    with tracker:
        recipe.step()
    return tracker.peak, "live tensor bytes high-water mark (TensorMemoryTracker)"


def measure_sampling(model: torch.nn.Module, schedule: CascadeSchedule, config: SamplerConfig, batch: int,
                     precision: str, device: torch.device, repeats: int) -> dict:
    """Seconds and counted model calls of sampling ``batch`` images with ``config`` (after one untimed warm-up)."""
    counter = CallCounter(model.eval())
    sampler = CascadeSampler(counter, schedule, config)
    labels = torch.arange(batch, device=device) % model.num_classes
    with sampling_precision(precision, device):
        seconds = timed(lambda: sampler.sample(labels, generator=torch.Generator(device).manual_seed(0)), device, repeats)
    runs = repeats + 1  # the warm-up is counted too: every run draws the same noise, so it makes the same calls
    return {"seconds_per_image": seconds / batch, "images_per_s": batch / seconds, "seconds_per_batch": seconds,
            "model_calls_per_image": counter.rows / (batch * runs), "forward_calls_per_batch": counter.calls / runs}


def sampling_report(model: PixelFlowTransformer, schedule: CascadeSchedule, args: argparse.Namespace,
                    device: torch.device) -> dict:
    measured = measure_sampling(model, schedule, SamplerConfig(method="euler", steps=args.sample_steps, guidance_scale=args.cfg),
                                args.sample_batch, args.sample_precision, device, 1)
    model.train()
    return {"images_per_s": measured["images_per_s"], "seconds_per_batch": measured["seconds_per_batch"],
            "batch": args.sample_batch, "precision": resolve_precision(args.sample_precision, device),
            "steps_per_stage": args.sample_steps, "cfg": args.cfg, "model_calls": int(measured["forward_calls_per_batch"]),
            "model_calls_per_image": measured["model_calls_per_image"]}


def sampling_benchmark(args: argparse.Namespace) -> dict:
    """``--sampling``: every method in ``args.methods`` on one model, batch, size and precision."""
    device = torch.device(args.device)
    if device.type == "meta":
        raise SystemExit("error: --sampling measures time and needs --device cpu or cuda (meta only counts FLOPs)")
    host_memory_kept = keep_freed_memory()  # as sample.py; PIXELFLOW_DEFAULT_MALLOC=1 measures glibc's default
    if args.ckpt:
        loaded = load_pixelflow(args.ckpt)
        model, schedule, weights = loaded.model.to(device), loaded.schedule, loaded.source
        if not model.num_classes:
            raise SystemExit(f"error: {args.ckpt} is a text-to-image model; --sampling measures class-to-image models")
    else:
        args.image_size = args.image_size or default_image_size(args.model)
        with torch.device(device):
            model = build_model(args.model, num_classes=args.num_classes or (10 if args.image_size <= 64 else 1000))
        schedule = CascadeSchedule(image_size=args.image_size, num_stages=args.num_stages)
        weights = "initial (untrained: zeroed output layer, velocity 0)"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    precision = resolve_precision(args.sample_precision, device)
    configs = {method: SamplerConfig(method=method, steps=args.sample_steps, guidance_scale=args.cfg) for method in args.methods}
    compile_seconds = None
    if args.compile:  # once, for every method's shapes; the timed runs below are then steady state
        shapes = sampling_shapes(schedule, configs.values(), [args.sample_batch])
        model, compile_seconds = compile_for_sampling(model.eval(), shapes, precision)
    methods = {method: measure_sampling(model, schedule, config, args.sample_batch, precision, device, args.repeats)
               for method, config in configs.items()}
    return {"model": args.model if not args.ckpt else None, "weights": weights,
            "params": sum(p.numel() for p in model.parameters()), "image_size": schedule.image_size,
            "num_stages": schedule.num_stages, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "host_memory_kept": host_memory_kept,
            "sampling": {"batch": args.sample_batch, "precision": precision, "steps_per_stage": args.sample_steps,
                         "cfg": args.cfg, "timed_runs": args.repeats, "compile": args.compile,
                         "compile_seconds": compile_seconds, "methods": methods}}


def sampling_flops_per_image(model: PixelFlowTransformer, schedule: CascadeSchedule, args: argparse.Namespace,
                             device: torch.device) -> float:
    """Forward FLOPs of one image through every stage, x Euler steps, x 2 for the guidance batch."""
    def forwards() -> None:
        with torch.no_grad():
            for side in schedule.stage_sides:
                model(torch.zeros(1, 3, side, side, device=device), torch.zeros(1, device=device),
                      torch.zeros(1, dtype=torch.long, device=device))

    return count_flops(forwards) * args.sample_steps * (2 if args.cfg > 1 else 1)


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(args: argparse.Namespace) -> dict:
    """Run every measurement the flags ask for; return the JSON-ready result."""
    if args.sampling:
        return sampling_benchmark(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    args.image_size = args.image_size or default_image_size(args.model)
    args.num_classes = args.num_classes or (10 if args.image_size <= 64 else 1000)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    recipe = Recipe(args, device)
    flops_per_image = count_flops(lambda: recipe.loss().backward()) / args.micro_batch
    recipe.model.zero_grad(set_to_none=True)
    result = {
        "model": args.model, "params": sum(p.numel() for p in recipe.model.parameters()),
        "image_size": args.image_size, "num_stages": args.num_stages, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "recipe": {"micro_batch": args.micro_batch, "accumulation": args.accumulation, "precision": args.precision,
                   "gradient_checkpointing": args.grad_checkpointing, "ema": args.ema, "optimizer": "AdamW",
                   "grad_clip": 1.0},
        "train": {"flops_per_image": flops_per_image},
        "mfu": None,
    }
    peak_tflops = device_peak_tflops(device, args.peak_tflops)
    if device.type == "meta":
        sample_flops = sampling_flops_per_image(recipe.model, recipe.schedule, args, device)
        result["sample"] = {"flops_per_image": sample_flops, "steps_per_stage": args.sample_steps, "cfg": args.cfg}
        for part, flops in ((result["train"], flops_per_image), (result["sample"], sample_flops)):
            part["estimated_images_per_s"] = (
                {f"mfu_{m:.2f}": m * peak_tflops * 1e12 / flops for m in args.assumed_mfu} if peak_tflops else None)
    else:
        seconds = timed(recipe.step, device, args.steps)
        images = args.micro_batch * args.accumulation
        peak, method = peak_memory(recipe)
        result["train"].update(images_per_s=images / seconds, step_time_s=seconds, peak_memory_bytes=peak,
                               peak_memory_method=method, process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if peak_tflops:
            result["mfu"] = flops_per_image * result["train"]["images_per_s"] / (peak_tflops * 1e12)
        if args.sample_batch:
            result["sample"] = sampling_report(recipe.model, recipe.schedule, args, device)
    if args.padding:
        result["padding"] = padding_report(recipe)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Tiny/4", help="a name in pixelflow.model.PIXELFLOW_CONFIGS")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for Tiny/Test, 256 otherwise")
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or meta (count FLOPs only)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up)")
    p.add_argument("--sample-batch", type=int, default=4, help="0 skips the sampling benchmark")
    p.add_argument("--sample-steps", type=int, default=2, help="steps per stage (Euler, Heun, AB2; Dopri5 adapts)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sample-precision", choices=PRECISIONS, default="auto",
                   help="sampling precision (pixelflow/precision.py): auto = bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--no-padding", dest="padding", action="store_false", help="skip the padded-batch comparison")
    p.add_argument("--sampling", action="store_true", help="measure sampling only: every method in --methods")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="--sampling: the methods to run")
    p.add_argument("--repeats", type=int, default=3, help="--sampling: timed runs per method (after one warm-up)")
    p.add_argument("--ckpt", default=None, help="--sampling: a checkpoint or export to sample from (its size and "
                   "stages; default: --model with initial weights)")
    p.add_argument("--compile", action="store_true", help="--sampling: torch.compile the network first "
                   "(pixelflow/sampling/compile.py; its time is compile_seconds, apart from the per-method speeds)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table by GPU name)")
    p.add_argument("--assumed-mfu", type=float, nargs="+", default=[0.3, 0.4, 0.5], help="for --device meta estimates")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
