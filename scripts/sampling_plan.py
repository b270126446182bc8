"""The plan of a 50k-sample ImageNet 256 run, printed before it starts (scripts/reproduce_imagenet256.sh).

Every figure is an estimate, labelled with its method:
- memory: pixelflow.sampling.memory (calibrated accounting; the same model sample.py refuses batches with);
- time: sampling FLOPs per image (FlopCounterMode over one guided forward per stage of XL/4 on the meta
  device, x model calls per stage) / (assumed MFU x the GPU's dense bf16 peak; fp32 runs at the TF32 peak
  at best, taken as half). Dopri5's model calls per stage are adaptive and unmeasured here: an assumption.
"""

from __future__ import annotations

import argparse

import torch

from pixelflow.benchmarking import stage_forward_flops
from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.precision import resolve_precision
from pixelflow.sampling.memory import GIB, max_fitting_batch, sampling_budget_bytes, sampling_peak_bytes


def plan(args: argparse.Namespace) -> str:
    with torch.device("meta"):
        net = build_model("XL/4", num_classes=1000)
    schedule = CascadeSchedule(image_size=256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = resolve_precision(args.precision, "cuda")  # what a GPU run uses
    here = resolve_precision(args.precision, device)
    budget = sampling_budget_bytes(sampling_peak_bytes(net, 256, args.batch, "dopri5", on_gpu))
    best = max_fitting_batch(net, 256, "dopri5", on_gpu, args.gpu_gb * 1e9)
    flops = stage_forward_flops(net, schedule, 2, "meta") * args.calls_per_stage  # a guided call: 2 rows
    rate = args.mfu * args.peak_tflops * 1e12 * (1.0 if on_gpu == "bf16" else 0.5)
    hours = args.num_samples * flops / rate / args.devices / 3600
    lines = [
        "[reproduce] plan (published protocol: Dopri5, CFG 2.4, balanced labels, 16 images per device and batch, bf16)",
        f"  images      {args.num_samples} into {args.out_dir} (resumable: finished shards are skipped)",
        f"  devices     {args.devices}",
        f"  batch       {args.batch} per device (largest that fits {args.gpu_gb:g} GB: {best}; estimated)",
        f"  precision   {args.precision} -> {on_gpu} on CUDA" + ("" if here == on_gpu else f", {here} on this {device}"),
        f"  memory      ~{budget / GIB:.1f} GiB per device (estimated: pixelflow.sampling.memory, calibrated accounting)",
        f"  time        ~{hours:.0f} h on {args.devices} x {args.gpu_name} (estimated: {flops / 1e12:.0f} TFLOP per image "
        f"= {args.calls_per_stage} guided calls per stage (assumed for Dopri5) x FlopCounterMode count, at "
        f"{args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s{' bf16' if on_gpu == 'bf16' else ' / 2 (fp32)'})",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out-dir", default="runs/reproduce_imagenet256")
    p.add_argument("--gpu-name", default="RTX 4090")
    p.add_argument("--gpu-gb", type=float, default=24.0)
    p.add_argument("--peak-tflops", type=float, default=165.0, help="dense bf16 peak of --gpu-name")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument("--calls-per-stage", type=int, default=30, help="assumed guided model calls per stage")
    args = p.parse_args(argv)
    if args.devices < 1 or args.batch < 1 or args.num_samples < 1:
        p.error(f"devices, batch and num-samples must be >= 1, got {args.devices}, {args.batch}, {args.num_samples}")
    return args


def main(argv: list[str] | None = None) -> None:
    print(plan(parse_args(argv)))


if __name__ == "__main__":
    main()
