"""The GPU measurements of scripts/gpu_check.sh, as one JSON object (``--dry-run``: tiny sizes on CPU).

Sampling XL/4 (random weights, 256 px) with Euler 30 steps + CFG and with Dopri5, batch 16, bf16 and fp32:
seconds per image and peak memory (torch.cuda.max_memory_allocated); bf16 vs fp32 pixel agreement on the same
noise; then the imagenet256_xl4_24gb training figures from scripts/benchmark.py (3 steps). Text-to-image:
T2I-XL/4 at 1024 px (random weights and 512-token text states, no T5), bf16 Euler, batch 1 and 3: peak memory
against pixelflow.sampling.memory's estimate (docs/sampling.md's 24 GB plan).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402

from pixelflow.cascade import CascadeSchedule  # noqa: E402
from pixelflow.model import build_model  # noqa: E402
from pixelflow.precision import sampling_precision  # noqa: E402
from pixelflow.sampling.memory import sampling_peak_bytes  # noqa: E402
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig  # noqa: E402
from pixelflow.text import TextCondition  # noqa: E402


def sampling_checks(model: str, image_size: int, batch: int, euler_steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        net = build_model(model, num_classes=1000).eval()
    with torch.no_grad():
        for p in net.parameters():  # the published init zeroes the output: random weights exercise the integrator
            p.normal_(0, 0.02)
    schedule = CascadeSchedule(image_size=image_size)
    labels = torch.arange(batch, device=device) % 1000
    report, images = {}, {}
    for method, config in (("euler", SamplerConfig(steps=euler_steps, guidance_scale=4.0)),
                           ("dopri5", SamplerConfig(method="dopri5", guidance_scale=2.4))):
        noise = CascadeNoise.draw(schedule, batch, 3, method == "dopri5", torch.Generator(device).manual_seed(0), device)
        for precision in ("bf16", "fp32"):
            sampler = CascadeSampler(net, schedule, config)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with sampling_precision(precision, device):
                out = sampler.sample(labels, noise=noise)
            benchmark.synchronize(device)
            seconds = time.perf_counter() - start
            images[method, precision] = out.images
            report[f"{method}_{precision}"] = {
                "seconds_per_image": seconds / batch, "model_calls_per_stage": out.nfe,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                "estimated_peak_gib": sampling_peak_bytes(net, image_size, batch, method, precision) / 2**30}
        diff = (images[method, "bf16"] - images[method, "fp32"]).abs()
        report[f"{method}_bf16_vs_fp32"] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                                            "units": "pixel values in [-1, 1]"}
    return {"model": model, "image_size": image_size, "batch": batch, "euler_steps": euler_steps, **report}


def text_memory_checks(model: str, image_size: int, batches: tuple[int, ...], text_length: int, device: torch.device) -> dict:
    """Peak memory of bf16 Euler text-to-image sampling (2 steps a stage: memory does not grow with steps) vs the estimate."""
    torch.manual_seed(0)
    with torch.device(device):
        net = build_model(model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    schedule, report = CascadeSchedule(image_size=image_size), {}
    for batch in batches:
        mask = torch.ones(2 * batch, text_length, dtype=torch.long, device=device)
        mask[:batch, 1:] = 0  # the empty prompt's single token
        text = TextCondition(torch.randn(2 * batch, text_length, net.cross_attention_dim, device=device), mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with sampling_precision("bf16", device):
            CascadeSampler(net, schedule, SamplerConfig(steps=2, guidance_scale=4.0)).sample(
                text, generator=torch.Generator(device).manual_seed(0))
        benchmark.synchronize(device)
        report[f"batch_{batch}"] = {
            "seconds": time.perf_counter() - start,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "estimated_peak_gib": sampling_peak_bytes(net, image_size, batch, "euler", "bf16", text_length=text_length) / 2**30}
    return {"model": model, "image_size": image_size, "text_length": text_length, "euler_steps": 2, **report}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="Test/2 at 32 px on CPU: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        sample = sampling_checks("Test/2", 32, 2, 2, device)
        text = text_memory_checks("T2I-Test/2", 32, (1, 2), 12, device)
        train = benchmark.run(benchmark.parse_args(["--model", "Test/2", "--micro-batch", "4", "--steps", "1",
                                                    "--sample-batch", "0", "--no-padding"]))
    else:
        sample = sampling_checks("XL/4", 256, 16, 30, device)
        text = text_memory_checks("T2I-XL/4", 1024, (1, 3), 512, device)
        train = benchmark.run(benchmark.parse_args([
            "--model", "XL/4", "--device", "cuda", "--micro-batch", "32", "--precision", "bf16-mixed",
            "--grad-checkpointing", "--steps", "3", "--sample-batch", "0", "--no-padding"]))
    result = {"dry_run": args.dry_run, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "sampling": sample, "text_to_image_memory": text,
              "training_imagenet256_xl4_24gb": {k: train[k] for k in ("recipe", "train", "mfu")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()
