"""Throughput and memory of one training recipe and of sampling; prints one JSON object.

    python scripts/benchmark.py                                   # Tiny/4, 32 px, CPU
    python scripts/benchmark.py --model XL/4 --micro-batch 32 --precision bf16-mixed --device cuda
    python scripts/benchmark.py --model XL/4 --device meta        # FLOPs only (no memory, no GPU)
    python scripts/benchmark.py --sampling --model XL/4 --device cuda --sample-batch 16 --sample-steps 30 --out s.json

What is measured and how: pixelflow/benchmarking.py. ``--sampling`` without ``--ckpt`` samples from initial
weights (velocity 0), so pass ``--ckpt`` for a trained model's Dopri5 step counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelflow.benchmarking import TRAINING_PRECISIONS, BenchmarkConfig, run_benchmark
from pixelflow.precision import PRECISIONS
from pixelflow.sampling.samplers import METHODS


def parse_args(argv: list[str] | None = None) -> tuple[BenchmarkConfig, Path | None]:
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="a name in pixelflow.model.PIXELFLOW_CONFIGS")
    p.add_argument("--image-size", type=int, default=d.image_size, help="default: 32 for Tiny/Test, 256 otherwise")
    p.add_argument("--num-stages", type=int, default=d.num_stages)
    p.add_argument("--num-classes", type=int, default=d.num_classes, help="default: 10 up to 64 px, 1000 above")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch)
    p.add_argument("--accumulation", type=int, default=d.accumulation)
    p.add_argument("--precision", choices=TRAINING_PRECISIONS, default=d.precision)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--device", default=d.device, help="cpu, cuda, or meta (count FLOPs only)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed optimizer steps (after one warm-up)")
    p.add_argument("--sample-batch", type=int, default=d.sample_batch, help="0 skips the sampling figure of a training run")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="steps per stage (Euler, Heun, AB2; Dopri5 adapts)")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--sample-precision", choices=PRECISIONS, default=d.sample_precision,
                   help="sampling precision (pixelflow/precision.py): auto = bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--no-padding", dest="padding", action="store_false", help="skip the padded-batch comparison")
    p.add_argument("--sampling", action="store_true", help="measure sampling only: every method in --methods")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods), help="--sampling: the methods to run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="--sampling: timed runs per method (after one warm-up)")
    p.add_argument("--ckpt", default=d.ckpt, help="--sampling: a checkpoint or export to sample from (its size and "
                   "stages; default: --model with initial weights)")
    p.add_argument("--preset-sampler", dest="recorded_sampler", action="store_false", help="--sampling a checkpoint that "
                   "records its sampler (a distilled student): time --methods/--sample-steps/--guidance-scale instead of it")
    p.add_argument("--compile", action="store_true", help="--sampling: torch.compile the network first "
                   "(pixelflow/sampling/compile.py; its time is compile_seconds, apart from the per-method speeds)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="device peak for MFU (default: table by GPU name)")
    p.add_argument("--assumed-mfu", type=float, nargs="+", default=list(d.assumed_mfu), help="for --device meta estimates")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    try:
        config = BenchmarkConfig(**{**args, "methods": tuple(args["methods"]), "assumed_mfu": tuple(args["assumed_mfu"])})
    except ValueError as err:
        p.error(str(err))
    return config, out


def main(argv: list[str] | None = None) -> None:
    config, out = parse_args(argv)
    text = json.dumps(run_benchmark(config), indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
