"""Throughput, FLOPs and memory of one training recipe, and sampling speed, as one JSON-ready dict.

Training: AdamW (foreach on CUDA), gradient clipping 1.0, EMA every step, ``accumulation``
micro-batches per optimizer step, the real ``cascade_loss`` (every stage at its own size, packed in
one pass) on random images. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the
high-water mark of live tensor bytes of :class:`pixelflow.profiling.TensorMemoryTracker` over one
extra step. FLOPs per image are ``FlopCounterMode``'s count of forward + backward of one micro-batch;
MFU is reported where a CUDA device (or ``peak_tflops``) gives the peak. ``padding`` compares that
unpadded loss (keys ``*_sub_batches``) with one padded batch at the full size: tokens, FLOPs and
(except on meta) measured time of forward + backward.

Sampling (``sampling=True``): seconds and model calls per image of every method in ``methods``
(compile time apart, as ``compile_seconds``). Model calls are network rows counted as they run
(:class:`pixelflow.sampling.call_counter.CallCounter`). Dopri5's step count depends on the weights:
without ``ckpt`` the network has its initial weights (zeroed output layer, velocity 0).
"""

from __future__ import annotations

import platform
import resource
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import load_pixelflow
from pixelflow.host_memory import keep_freed_memory
from pixelflow.model import build_model
from pixelflow.precision import PRECISIONS, resolve_precision, sampling_precision
from pixelflow.profiling import TensorMemoryTracker, count_flops, device_peak_tflops, timed
from pixelflow.sampling.call_counter import CallCounter
from pixelflow.sampling.compile import compile_for_sampling, sampling_shapes
from pixelflow.sampling.samplers import METHODS, CascadeSampler, SamplerConfig
from pixelflow.training.objective import cascade_loss

__all__ = ["BenchmarkConfig", "TRAINING_PRECISIONS", "run_benchmark", "training_autocast", "stage_tokens",
           "stage_forward_flops"]

TRAINING_PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names, as trainer.precision takes them


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark: the recipe (model, batch, precision, ...) and what to measure of it."""

    model: str = "Tiny/4"  # a name in pixelflow.model.PIXELFLOW_CONFIGS
    image_size: int | None = None  # None: 32 for Tiny/Test, 256 otherwise
    num_stages: int = 4
    num_classes: int | None = None  # None: 10 up to 64 px, 1000 above
    micro_batch: int = 8
    accumulation: int = 1
    precision: str = "32-true"  # training precision, one of TRAINING_PRECISIONS
    grad_checkpointing: bool = False
    ema: bool = True
    device: str = "cpu"  # cpu, cuda, or meta (count FLOPs only)
    steps: int = 3  # timed optimizer steps (after one warm-up)
    sample_batch: int = 4  # training benchmark: images of its sampling figure (0: none)
    sample_steps: int = 2  # steps per stage (Euler, Heun, AB2; Dopri5 adapts)
    guidance_scale: float = 4.0
    sample_precision: str = "auto"  # pixelflow.precision: auto = bf16 on CUDA, fp32 elsewhere
    padding: bool = True  # compare with one padded batch at the full size
    sampling: bool = False  # measure sampling only: every method in ``methods``
    methods: tuple[str, ...] = METHODS
    repeats: int = 3  # sampling: timed runs per method (after one warm-up)
    ckpt: str | None = None  # sampling: a checkpoint or export to sample from (default: ``model``, initial weights)
    recorded_sampler: bool = True  # sampling a checkpoint that records its sampler (a distilled student): time that one
    compile: bool = False  # sampling: torch.compile the network first
    peak_tflops: float | None = None  # device peak for MFU (default: pixelflow.profiling.PEAK_BF16_TFLOPS)
    assumed_mfu: tuple[float, ...] = (0.3, 0.4, 0.5)  # meta device: images/s estimated at these MFUs

    def __post_init__(self) -> None:
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {TRAINING_PRECISIONS}")
        if self.sample_precision not in PRECISIONS:
            raise ValueError(f"sample_precision={self.sample_precision!r}: use one of {PRECISIONS}")
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"methods {unknown} are not sampling methods; use some of {METHODS}")
        if self.sampling and torch.device(self.device).type == "meta":
            raise ValueError("sampling measures time and needs device cpu or cuda (the meta device only counts FLOPs)")
        if self.sampling and self.sample_batch < 1:
            raise ValueError(f"sampling needs sample_batch >= 1, got {self.sample_batch}")
        if min(self.micro_batch, self.accumulation, self.steps, self.repeats) < 1:
            raise ValueError(f"micro_batch, accumulation, steps and repeats must be >= 1, got {self.micro_batch}, "
                             f"{self.accumulation}, {self.steps}, {self.repeats}")


def _with_default_sizes(config: BenchmarkConfig) -> BenchmarkConfig:
    image_size = config.image_size or (32 if config.model.split("/")[0] in ("Tiny", "Test") else 256)
    return replace(config, image_size=image_size, num_classes=config.num_classes or (10 if image_size <= 64 else 1000))


def training_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast of Lightning's trainer precision ``precision`` (bf16 for ``bf16-mixed``) on ``device``."""
    if precision == "bf16-mixed" and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def stage_tokens(schedule: CascadeSchedule, patch: int, batch: int) -> tuple[int, int]:
    """(tokens with per-stage sub-batches, tokens if every sample were padded to the full size) of a batch
    whose samples are spread over the stages in turn."""
    counts = torch.bincount(torch.arange(batch) % schedule.num_stages, minlength=schedule.num_stages).tolist()
    sub = sum(n * (side // patch) ** 2 for n, side in zip(counts, schedule.stage_sides))
    return sub, batch * (schedule.image_size // patch) ** 2


def stage_forward_flops(model: torch.nn.Module, schedule: CascadeSchedule, rows: int, device: torch.device | str) -> int:
    """FLOPs of one class-conditional model call on ``rows`` rows at every stage's size (rows=2: a guided call)."""
    def forwards() -> None:
        with torch.no_grad():
            for side in schedule.stage_sides:
                model(torch.zeros(rows, 3, side, side, device=device), torch.zeros(rows, device=device),
                      torch.zeros(rows, dtype=torch.long, device=device))

    return count_flops(forwards)


class Recipe:
    """Model, schedule, AdamW, EMA and one optimizer step of ``accumulation`` micro-batches."""

    def __init__(self, config: BenchmarkConfig, device: torch.device):
        self.config, self.device = config, device
        with torch.device(device):
            self.model = build_model(config.model, num_classes=config.num_classes,
                                     gradient_checkpointing=config.grad_checkpointing).train()
        self.schedule = CascadeSchedule(image_size=config.image_size, num_stages=config.num_stages)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9999)) if config.ema else None
        self.generator = torch.Generator(device if device.type != "meta" else "cpu").manual_seed(0)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, d = self.config, self.device
        images = torch.rand(c.micro_batch, 3, c.image_size, c.image_size, device=d) * 2 - 1
        return images, torch.randint(0, c.num_classes, (c.micro_batch,), device=d)

    def loss(self) -> torch.Tensor:
        if self.device.type == "meta":
            return self.meta_loss()
        images, labels = self.batch()
        with training_autocast(self.device, self.config.precision):
            loss, _ = cascade_loss(self.model, self.schedule, images, labels, self.generator, label_dropout=0.1)
        return loss

    def meta_loss(self) -> torch.Tensor:
        """cascade_loss's packed pass over balanced stages without its data-dependent indexing, for FLOP counts."""
        counts = torch.bincount(torch.arange(self.config.micro_batch) % self.schedule.num_stages).tolist()
        present = [(n, side) for n, side in zip(counts, self.schedule.stage_sides) if n]
        xs = [torch.zeros(n, 3, side, side, device=self.device) for n, side in present]
        ts = [torch.zeros(n, device=self.device) for n, _ in present]
        labels = torch.zeros(sum(n for n, _ in present), dtype=torch.long, device=self.device)
        preds = self.model(xs, ts, labels)
        return torch.cat([(pred - x).square().mean(dim=(1, 2, 3)) for pred, x in zip(preds, xs)]).mean()

    def padded_loss(self) -> torch.Tensor:
        """The padded alternative's cost: every sample through the network at the full size."""
        images, labels = self.batch()
        t = torch.rand(images.shape[0], device=images.device) * 999
        with training_autocast(self.device, self.config.precision):
            return F.mse_loss(self.model(images, t, labels).float(), images)

    def step(self) -> None:
        for _ in range(self.config.accumulation):
            (self.loss() / self.config.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def peak_memory(self) -> tuple[int, str]:
        """Peak bytes of one optimizer step (after a warm-up step, so AdamW state exists) and how they were read."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            return torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
        tracker = TensorMemoryTracker()
        tracker.track(*self.model.parameters(), *self.model.buffers())
        tracker.track(*[t for state in self.optimizer.state.values() for t in state.values()])
        if self.ema is not None:
            tracker.track(*self.ema.parameters(), *self.ema.buffers())
        with tracker:
            self.step()
        return tracker.peak, "live tensor bytes high-water mark (TensorMemoryTracker)"


def _padding_report(recipe: Recipe) -> dict:
    model, config = recipe.model, recipe.config
    sub_tokens, pad_tokens = stage_tokens(recipe.schedule, model.patch_size, config.micro_batch)
    report = {"micro_batch": config.micro_batch, "tokens_sub_batches": sub_tokens, "tokens_padded": pad_tokens,
              "token_ratio_padded_over_sub": pad_tokens / sub_tokens,
              "flops_sub_batches": count_flops(lambda: recipe.loss().backward()),
              "flops_padded": count_flops(lambda: recipe.padded_loss().backward())}
    report["flop_ratio_padded_over_sub"] = report["flops_padded"] / report["flops_sub_batches"]
    model.zero_grad(set_to_none=True)
    if recipe.device.type != "meta":
        report["seconds_sub_batches"] = timed(lambda: recipe.loss().backward(), recipe.device, config.steps)
        report["seconds_padded"] = timed(lambda: recipe.padded_loss().backward(), recipe.device, config.steps)
        report["time_ratio_padded_over_sub"] = report["seconds_padded"] / report["seconds_sub_batches"]
        model.zero_grad(set_to_none=True)
    return report


def _measure_sampling(model: torch.nn.Module, schedule: CascadeSchedule, sampler_config: SamplerConfig, batch: int,
                      precision: str, device: torch.device, repeats: int) -> dict:
    """Seconds and counted model calls of sampling ``batch`` images (after one untimed warm-up)."""
    counter = CallCounter(model.eval())
    sampler = CascadeSampler(counter, schedule, sampler_config)
    labels = torch.arange(batch, device=device) % model.num_classes
    with sampling_precision(precision, device):
        seconds = timed(lambda: sampler.sample(labels, generator=torch.Generator(device).manual_seed(0)), device, repeats)
    runs = repeats + 1  # the warm-up is counted too: every run draws the same noise, so it makes the same calls
    return {"seconds_per_image": seconds / batch, "images_per_s": batch / seconds, "seconds_per_batch": seconds,
            "model_calls_per_image": counter.rows / (batch * runs), "forward_calls_per_batch": counter.calls / runs}


def _sampling_figure(recipe: Recipe) -> dict:
    """The training benchmark's sampling figure: one timed Euler run of the recipe's (training) network."""
    c = recipe.config
    sampler = SamplerConfig(method="euler", steps=c.sample_steps, guidance_scale=c.guidance_scale)
    measured = _measure_sampling(recipe.model, recipe.schedule, sampler, c.sample_batch, c.sample_precision, recipe.device, 1)
    recipe.model.train()
    return {"images_per_s": measured["images_per_s"], "seconds_per_batch": measured["seconds_per_batch"],
            "batch": c.sample_batch, "precision": resolve_precision(c.sample_precision, recipe.device),
            "steps_per_stage": c.sample_steps, "guidance_scale": c.guidance_scale, "model_calls": int(measured["forward_calls_per_batch"]),
            "model_calls_per_image": measured["model_calls_per_image"]}


def _machine(device: torch.device) -> dict:
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _sampling_benchmark(config: BenchmarkConfig) -> dict:
    """Every method in ``config.methods`` on one model, batch, size and precision."""
    device = torch.device(config.device)
    host_memory_kept = keep_freed_memory()  # as sample.py; PIXELFLOW_DEFAULT_MALLOC=1 measures glibc's default
    if config.ckpt:
        loaded = load_pixelflow(config.ckpt)
        model, schedule, weights = loaded.model.to(device), loaded.schedule, loaded.source
        if not model.num_classes:
            raise ValueError(f"{config.ckpt} is a text-to-image model; the sampling benchmark measures class-to-image models")
    else:
        config = _with_default_sizes(config)
        with torch.device(device):
            model = build_model(config.model, num_classes=config.num_classes)
        schedule = CascadeSchedule(image_size=config.image_size, num_stages=config.num_stages)
        weights = "initial (untrained: zeroed output layer, velocity 0)"
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    precision = resolve_precision(config.sample_precision, device)
    sampler_configs = {m: SamplerConfig(method=m, steps=config.sample_steps, guidance_scale=config.guidance_scale) for m in config.methods}
    if config.ckpt and loaded.sampler and config.recorded_sampler:  # what the student was distilled for, not the flags
        recorded = SamplerConfig.from_mapping(loaded.sampler, where="the checkpoint's recorded sampler")
        sampler_configs = {recorded.method: recorded}
    first = next(iter(sampler_configs.values()))
    compile_seconds = None
    if config.compile:  # once, for every method's shapes; the timed runs below are then steady state
        shapes = sampling_shapes(schedule, sampler_configs.values(), [config.sample_batch])
        model, compile_seconds = compile_for_sampling(model.eval(), shapes, precision)
    methods = {m: _measure_sampling(model, schedule, sc, config.sample_batch, precision, device, config.repeats)
               for m, sc in sampler_configs.items()}
    return {"model": None if config.ckpt else config.model, "weights": weights,
            "params": sum(p.numel() for p in model.parameters()), "image_size": schedule.image_size,
            "num_stages": schedule.num_stages, **_machine(device), "host_memory_kept": host_memory_kept,
            "sampling": {"batch": config.sample_batch, "precision": precision, "steps_per_stage": first.steps,
                         "guidance_scale": first.guidance_scale, "timed_runs": config.repeats, "compile": config.compile,
                         "compile_seconds": compile_seconds, "methods": methods}}


def _training_benchmark(config: BenchmarkConfig) -> dict:
    device = torch.device(config.device)
    torch.manual_seed(0)
    config = _with_default_sizes(config)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    recipe = Recipe(config, device)
    flops_per_image = count_flops(lambda: recipe.loss().backward()) / config.micro_batch
    recipe.model.zero_grad(set_to_none=True)
    result = {
        "model": config.model, "params": sum(p.numel() for p in recipe.model.parameters()),
        "image_size": config.image_size, "num_stages": config.num_stages, **_machine(device),
        "recipe": {"micro_batch": config.micro_batch, "accumulation": config.accumulation, "precision": config.precision,
                   "gradient_checkpointing": config.grad_checkpointing, "ema": config.ema, "optimizer": "AdamW",
                   "grad_clip": 1.0},
        "train": {"flops_per_image": flops_per_image},
        "mfu": None,
    }
    peak_tflops = device_peak_tflops(device, config.peak_tflops)
    if device.type == "meta":
        guidance = 2 if config.guidance_scale > 1 else 1  # a guided call runs the conditional and the unconditional row
        sample_flops = stage_forward_flops(recipe.model, recipe.schedule, 1, device) * config.sample_steps * guidance
        result["sample"] = {"flops_per_image": sample_flops, "steps_per_stage": config.sample_steps,
                            "guidance_scale": config.guidance_scale}
        for part, flops in ((result["train"], flops_per_image), (result["sample"], sample_flops)):
            part["estimated_images_per_s"] = (
                {f"mfu_{m:.2f}": m * peak_tflops * 1e12 / flops for m in config.assumed_mfu} if peak_tflops else None)
    else:
        seconds = timed(recipe.step, device, config.steps)
        images = config.micro_batch * config.accumulation
        peak, method = recipe.peak_memory()
        result["train"].update(images_per_s=images / seconds, step_time_s=seconds, peak_memory_bytes=peak,
                               peak_memory_method=method,
                               process_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if peak_tflops:
            result["mfu"] = flops_per_image * result["train"]["images_per_s"] / (peak_tflops * 1e12)
        if config.sample_batch:
            result["sample"] = _sampling_figure(recipe)
    if config.padding:
        result["padding"] = _padding_report(recipe)
    return result


def run_benchmark(config: BenchmarkConfig) -> dict:
    """Every measurement ``config`` asks for, as a JSON-ready dict (sampling only when ``config.sampling``)."""
    return _sampling_benchmark(config) if config.sampling else _training_benchmark(config)
