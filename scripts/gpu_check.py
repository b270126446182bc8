"""One measurement of scripts/gpu_check.sh as JSON (``--dry-run``: the same at tiny sizes on CPU).

    python scripts/gpu_check.py --part sampling --out sampling.json

``--part sampling``: XL/4 (random weights, 256 px). Euler 30 steps + CFG at batch 16 in bf16 (seconds per
image, peak memory against pixelflow.sampling.memory's estimate); Euler 10 steps on 2 images in bf16 and
fp32 from the same noise (their pixel agreement, and fp32's speed and memory: fp32 runs without TF32, on
CUDA cores instead of tensor cores, so it runs on few images); Dopri5 + CFG in bf16 at batch 4 (its
CFG-doubled state is the estimate's largest term).
``--part text``: T2I-XL/4 at 1024 px (random weights and 512-token text states, no T5), bf16 Euler with one
step a stage, batch 1 and 3: peak memory against the estimate (docs/sampling.md's 24 GB plan).
``--part train``: the imagenet256_xl4_24gb training figures from scripts/benchmark.py (2 timed steps).
``--part distill``: the first steps of experiment=imagenet256_xl4_distill with a random XL/4 as teacher and
student: teacher pairs (AB2 at 8 steps a stage, guidance 2.4, bf16; seconds a pair) and reflow steps of the
24 GB layout (micro-batch 32, activation checkpointing, bf16 autocast, AdamW + EMA; seconds and peak memory).

``--out`` is rewritten (atomically) after every measurement, so a part cut short by its timeout still
reports what it finished.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pixelflow.atomic import atomic_write_text
from pixelflow.benchmarking import BenchmarkConfig, run_benchmark
from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.precision import sampling_precision
from pixelflow.profiling import synchronize
from pixelflow.sampling.memory import STATE_LATENTS, sampling_peak_bytes
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition
from pixelflow.training.distill import reflow_loss

GIB = 2**30
# Per part: full size on one GPU, and the dry run's tiny sizes on CPU.
SAMPLING = {"full": dict(model="XL/4", image_size=256, batch=16, steps=30, pair_batch=2, pair_steps=10, dopri5_batch=4),
            "dry": dict(model="Test/2", image_size=32, batch=2, steps=2, pair_batch=2, pair_steps=2, dopri5_batch=2)}
TEXT = {"full": dict(model="T2I-XL/4", image_size=1024, batches=(1, 3), text_length=512),
        "dry": dict(model="T2I-Test/2", image_size=32, batches=(1, 2), text_length=12)}
# estimated_peak_gib: docs/scale.md's imagenet256_xl4_24gb estimate (a reflow step is a training step of that layout).
DISTILL = {"full": dict(model="XL/4", image_size=256, pairs=2, teacher_steps=8, micro_batch=32, steps=2, estimated_peak_gib=17.3),
           "dry": dict(model="Test/2", image_size=32, pairs=2, teacher_steps=2, micro_batch=4, steps=1, estimated_peak_gib=None)}
TRAIN = {"full": BenchmarkConfig(model="XL/4", device="cuda", micro_batch=32, precision="bf16-mixed", grad_checkpointing=True,
                                 steps=2, sample_batch=0, padding=False),
         "dry": BenchmarkConfig(model="Test/2", micro_batch=4, steps=1, sample_batch=0, padding=False)}


class Report:
    """The part's JSON object, written to ``path`` (if any) after every entry."""

    def __init__(self, path: str | None, **fields):
        self.path, self.data = path, dict(fields)

    def add(self, key: str, value) -> None:
        self.data[key] = value
        if self.path:
            atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def random_network(name: str, device: torch.device, **kwargs) -> torch.nn.Module:
    """``name`` with N(0, 0.02) weights: the published init zeroes the output, random weights exercise the integrator."""
    torch.manual_seed(0)
    with torch.device(device):
        net = build_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def start_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def sample(net, schedule, config: SamplerConfig, precision: str, labels, noise, device) -> tuple[torch.Tensor, dict]:
    """One timed sampling run: its images and its entry (seconds per image, model calls, peak vs estimate)."""
    batch = len(labels)
    start_peak(device)
    start = time.perf_counter()
    with sampling_precision(precision, device):
        out = CascadeSampler(net, schedule, config).sample(labels, noise=noise)
    synchronize(device)
    seconds = time.perf_counter() - start
    estimate = (sampling_peak_bytes(net, schedule.image_size, batch, config.method, precision, steps=config.steps)
                if config.method in STATE_LATENTS else None)  # AB2's state has no measured coefficient yet
    steps = None if config.method == "dopri5" else config.steps  # Dopri5 adapts: see model_calls_per_stage
    return out.images, {"method": config.method, "precision": precision, "batch": batch, "steps": steps,
                        "seconds_per_image": seconds / batch, "model_calls_per_stage": out.nfe,
                        "peak_memory_gib": peak_gib(device),
                        "estimated_peak_gib": None if estimate is None else estimate / GIB}


def sampling_checks(size: dict, device: torch.device, report: Report) -> None:
    net = random_network(size["model"], device, num_classes=1000)
    schedule = CascadeSchedule(image_size=size["image_size"])

    def draw(batch: int, doubled: bool = False) -> tuple[torch.Tensor, CascadeNoise]:
        labels = torch.arange(batch, device=device) % 1000
        return labels, CascadeNoise.draw(schedule, batch, 3, doubled, torch.Generator(device).manual_seed(0), device)

    labels, noise = draw(2)  # warm-up (CUDA context, library handles): untimed
    sample(net, schedule, SamplerConfig(steps=1), "bf16", labels, noise, device)
    euler = SamplerConfig(steps=size["steps"], guidance_scale=4.0)
    report.add("euler_bf16", sample(net, schedule, euler, "bf16", *draw(size["batch"]), device)[1])
    pair = SamplerConfig(steps=size["pair_steps"], guidance_scale=4.0)
    labels, noise = draw(size["pair_batch"])
    images = {}
    for precision in ("bf16", "fp32"):
        images[precision], entry = sample(net, schedule, pair, precision, labels, noise, device)
        report.add(f"euler_{precision}_pair", entry)
    diff = (images["bf16"] - images["fp32"]).abs()
    report.add("euler_bf16_vs_fp32", {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                                      "units": "pixel values in [-1, 1]"})
    dopri5 = SamplerConfig(method="dopri5", guidance_scale=2.4)
    report.add("dopri5_bf16", sample(net, schedule, dopri5, "bf16", *draw(size["dopri5_batch"], doubled=True), device)[1])


def text_memory_checks(size: dict, device: torch.device, report: Report) -> None:
    """Peak memory of bf16 Euler text-to-image sampling (one step a stage) against the estimate."""
    net = random_network(size["model"], device)
    schedule, length = CascadeSchedule(image_size=size["image_size"]), size["text_length"]
    config = SamplerConfig(steps=1, guidance_scale=4.0)
    for batch in size["batches"]:
        mask = torch.ones(2 * batch, length, dtype=torch.long, device=device)
        mask[:batch, 1:] = 0  # the empty prompt's single token
        text = TextCondition(torch.randn(2 * batch, length, net.cross_attention_dim, device=device), mask)
        start_peak(device)
        start = time.perf_counter()
        with sampling_precision("bf16", device):
            CascadeSampler(net, schedule, config).sample(text, generator=torch.Generator(device).manual_seed(0))
        synchronize(device)
        estimate = sampling_peak_bytes(net, schedule.image_size, batch, "euler", "bf16", text_length=length, steps=1)
        report.add(f"batch_{batch}", {"seconds": time.perf_counter() - start, "peak_memory_gib": peak_gib(device),
                                      "estimated_peak_gib": estimate / GIB})


def distill_checks(size: dict, device: torch.device, report: Report) -> None:
    """Teacher pairs at the ImageNet distillation's teacher sampler, then reflow steps of its 24 GB layout."""
    teacher = random_network(size["model"], device, num_classes=1000)
    schedule = CascadeSchedule(image_size=size["image_size"])
    labels = torch.arange(size["pairs"], device=device)
    noise = CascadeNoise.draw(schedule, size["pairs"], 3, False, torch.Generator(device).manual_seed(0), device)
    sample(teacher, schedule, SamplerConfig(steps=1), "bf16", labels, noise, device)  # warm-up: untimed
    pairs = SamplerConfig(method="ab2", steps=size["teacher_steps"], guidance_scale=2.4)
    report.add("teacher_pairs_bf16", sample(teacher, schedule, pairs, "bf16", labels, noise, device)[1])
    del teacher
    student = random_network(size["model"], device, num_classes=1000, gradient_checkpointing=True).train()
    params = list(student.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=device.type == "cuda")
    batch, generator = size["micro_batch"], torch.Generator(device).manual_seed(1)
    ends = [torch.randn(batch, 3, side, side, device=device, generator=generator) for side in schedule.stage_sides]
    labels = torch.arange(batch, device=device) % 1000
    start_peak(device)
    seconds = []
    for _ in range(size["steps"] + 1):  # the first step is a warm-up
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            loss, _ = reflow_loss(student, schedule, ends, labels, list(range(batch)), generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    report.add("reflow_steps", {"micro_batch": batch, "gradient_checkpointing": True, "precision": "bf16-mixed",
                                "seconds_per_step": min(seconds[1:]), "loss": float(loss.detach()),
                                "peak_memory_gib": peak_gib(device), "estimated_peak_gib": size["estimated_peak_gib"]})


def training_checks(config: BenchmarkConfig, report: Report) -> None:
    train = run_benchmark(config)
    for key in ("recipe", "train", "mfu"):
        report.add(key, train[key])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", required=True, choices=("sampling", "text", "train", "distill"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="write the JSON here (after every measurement)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    size = "dry" if args.dry_run else "full"
    report = Report(args.out, part=args.part, dry_run=args.dry_run, torch=torch.__version__,
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if args.part == "sampling":
        report.add("model", SAMPLING[size]["model"])
        sampling_checks(SAMPLING[size], device, report)
    elif args.part == "text":
        report.add("model", TEXT[size]["model"])
        text_memory_checks(TEXT[size], device, report)
    elif args.part == "distill":
        report.add("model", DISTILL[size]["model"])
        distill_checks(DISTILL[size], device, report)
    else:
        training_checks(TRAIN[size], report)
    print(json.dumps(report.data, indent=2))
    return report.data


if __name__ == "__main__":
    main()
