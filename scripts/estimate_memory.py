"""Peak training (or sampling) memory of a recipe on a GPU we do not have, by calibrated accounting.

    python scripts/estimate_memory.py                       # imagenet256_xl4_24gb: XL/4, bf16, micro 32, ckpt, EMA
    python scripts/estimate_memory.py --no-grad-checkpointing --micro-batch 8
    python scripts/estimate_memory.py --validate            # the method checked on a small model on CPU
    python scripts/estimate_memory.py --sampling --batch 16 --method dopri5

The method and its terms: pixelflow/training/memory_estimate.py.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from pixelflow.sampling.memory import GIB, PUBLISHED_STEPS
from pixelflow.training.memory_estimate import (
    fit,
    fit_sampling,
    fit_text,
    gib,
    measure_runs,
    predict,
    sampling_estimates,
    validate,
    validate_sampling,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="XL/4")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--micro-batch", type=int, nargs="+", default=[32], help="one estimate per value")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="bf16-mixed")
    p.add_argument("--no-grad-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--gpu-gib", type=float, default=24.0 * 1e9 / GIB, help="device memory (default a '24 GB' card)")
    p.add_argument("--calibration-size", type=int, default=128,
                   help="image size of the CPU calibration steps (token counts are extrapolated linearly)")
    p.add_argument("--calibration", default=None, help="reuse calibration_runs from an earlier output JSON of this script")
    p.add_argument("--validate", action="store_true", help="check the method on --validate-model instead")
    p.add_argument("--validate-model", nargs="+", default=["Tiny/4", "S/4"])
    p.add_argument("--sampling", action="store_true",
                   help="sampling instead of training: --batch per method and precision (pixelflow.sampling.memory)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 64, 100], help="--sampling batches")
    p.add_argument("--method", nargs="+", default=["dopri5", "euler"], help="--sampling methods")
    p.add_argument("--steps", type=int, default=PUBLISHED_STEPS, help="--sampling: steps a stage (fixed-grid methods)")
    p.add_argument("--ddp", action="store_true", help="training: count DDP's gradient buckets (one process per GPU)")
    p.add_argument("--grid-steps", type=int, default=10, help="training: the SampleGrid callback's steps")
    p.add_argument("--no-encoder-on-device", dest="encoder_on_device", action="store_false",
                   help="with --sampling and a T2I model: the text encoder lives elsewhere (CPU, another device)")
    p.add_argument("--text", action="store_true", help="with --sampling: refit the T2I cross-attention term on CPU")
    p.add_argument("--calibrate", action="store_true",
                   help="with --sampling: refit the forward coefficients on CPU and check them on whole Test/2 runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpointing's use_reentrant notes etc.
        if args.sampling:
            result = {"model": args.model, "image_size": args.image_size, "steps": args.steps, "units": "GiB",
                      "estimates": sampling_estimates(args.model, args.image_size, args.batch, args.method,
                                                      args.encoder_on_device, args.steps)}
            if args.text:
                result["fitted_text_weight_copy_bytes"] = {p: fit_text(p) for p in ("fp32", "bf16")}
            if args.calibrate:
                result["fitted_coefficients"] = {p: fit_sampling(args.model, p)[0] for p in ("fp32", "bf16")}
                result["whole_runs"] = validate_sampling("Test/2")
        elif args.validate:
            result = {"validation": [check for m in args.validate_model for ckpt in (False, True)
                                     for check in validate(m, args.precision, ckpt, args.ema, args.micro_batch)]}
        else:
            setting = {"model": args.model, "calibration_size": args.calibration_size, "precision": args.precision,
                       "gradient_checkpointing": args.ckpt, "ema": args.ema, "ddp": args.ddp}
            if args.calibration:
                earlier = json.loads(Path(args.calibration).read_text())
                if any(earlier[k] != v for k, v in setting.items() if k not in ("ema", "ddp")):  # both only change S
                    raise SystemExit(f"{args.calibration} was calibrated for a different setting than {setting}")
                runs = earlier["calibration_runs"]
            else:
                runs = measure_runs(args.model, args.precision, args.ckpt, args.ema, args.calibration_size)
            cal = fit(runs)
            estimates = []
            for mb in args.micro_batch:
                est = gib(predict(cal, args.model, args.image_size, mb, args.ema, grid_steps=args.grid_steps, ddp=args.ddp))
                est.update(micro_batch=mb, fits=est["budget"] <= args.gpu_gib)
                estimates.append(est)
            result = {**setting, "image_size": args.image_size, "gpu_gib": round(args.gpu_gib, 2), "units": "GiB (tokens, params: counts)",
                      "estimates": estimates, "calibration": cal, "calibration_runs": runs}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
