"""Checks this implementation against a class-to-image golden folder of the published implementation's numbers.

The folder layout is the one documented in ``tests/data/golden/README.md``; every size, step count,
shift and guidance scale is read from the folder, never assumed. The forward, scheduler, training-target
and Euler rows have fixed bounds (:data:`pixelflow.golden.common.TOLERANCES`); each Dopri5 row is bounded
by the sensitivity to float rounding measured on this folder (:mod:`pixelflow.golden.sensitivity`), and
its model-call counts must match exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.golden.common import CheckResult, load_golden_model, max_abs_error, read_json, require_files, sampler_config
from pixelflow.golden.sensitivity import rounding_sensitivity
from pixelflow.rope import rope_2d
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SampleOutput, euler_time_grid

__all__ = ["GoldenFolder", "patchify"]

_FILES = ["model_config.json", "sample_settings.json", "model_forward.npz", "scheduler.npz", "train_targets.npz",
          "sample_euler.npz", "sample_dopri5.npz"]


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (g*g, C*p*p) token features in (channel, row-in-patch, col-in-patch) order."""
    c, h, w = x.shape
    tokens = x.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
    return tokens.reshape((h // patch) * (w // patch), c * patch * patch)


class GoldenFolder:
    """Loads a golden folder and builds the matching model and schedule."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        require_files(self.root, _FILES, "tests/data/golden/README.md")
        self.config = read_json(self.root / "model_config.json")
        self.settings = read_json(self.root / "sample_settings.json")
        self.forward = np.load(self.root / "model_forward.npz")
        self.scheduler = np.load(self.root / "scheduler.npz")
        kwargs = {k: v for k, v in self.config["constructor_kwargs"].items() if k not in ("dropout", "cross_attention_dim")}
        self.model = load_golden_model(kwargs, self.forward)
        self.schedule = CascadeSchedule(
            image_size=int(self.config["image_size"]),
            num_stages=int(self.scheduler["num_stages"]),
            num_train_timesteps=int(self.scheduler["num_train_timesteps"]),
            gamma=float(self.scheduler["gamma"]),
        )

    # ---- checks ------------------------------------------------------------------------
    def check_forward(self) -> list[CheckResult]:
        out, f = [], self.forward
        for k in range(self.schedule.num_stages):
            x = torch.from_numpy(f[f"stage{k}/x"])
            labels = torch.from_numpy(f[f"stage{k}/class_labels"]).long()
            grid = int(f[f"stage{k}/latent_size"][0])
            cos, sin = rope_2d(grid, self.model.head_dim)
            rope = f[f"stage{k}/rope"]
            out.append(CheckResult(f"stage{k} rope", "forward", max(max_abs_error(cos, rope[..., 0]), max_abs_error(sin, rope[..., 1]))))
            with torch.no_grad():
                v, inter = self.model(x, torch.from_numpy(f[f"stage{k}/timestep"]), labels, return_intermediates=True)
                v_mixed = self.model(x, torch.from_numpy(f[f"stage{k}/mixed/timestep"]), labels)
            out.append(CheckResult(f"stage{k} forward", "forward", max_abs_error(v, f[f"stage{k}/out"])))
            out.append(CheckResult(f"stage{k} forward per-row T", "forward", max_abs_error(v_mixed, f[f"stage{k}/mixed/out"])))
            out.append(CheckResult(f"stage{k} tokens_in", "forward", max_abs_error(inter["tokens_in"], f[f"stage{k}/debug/tokens_in"])))
            out.append(CheckResult(f"stage{k} cond", "forward", max_abs_error(inter["cond"], f[f"stage{k}/debug/cond"])))
            blocks = [max_abs_error(h, f[f"stage{k}/debug/block{i}_out"]) for i, h in enumerate(inter["blocks"])]
            out.append(CheckResult(f"stage{k} block outputs ({len(blocks)})", "forward", max(blocks)))
        return out

    def check_scheduler(self) -> list[CheckResult]:
        s, sch = self.scheduler, self.schedule
        rows = [
            CheckResult("Timesteps_per_stage", "scheduler", max_abs_error(sch.timestep_tables, s["Timesteps_per_stage"])),
            CheckResult("original/rectified start, end", "scheduler", max(
                max_abs_error(sch.original_starts, s["original_start_t"]), max_abs_error(sch.starts, s["start_t"]),
                max_abs_error(sch.ends, s["end_t"]))),
            CheckResult("renoise alpha, beta", "scheduler", max(
                max_abs_error([sch.renoise_coefficients(int(k))[0] for k in s["renoise/stages"]], s["renoise/alpha"]),
                max_abs_error([sch.renoise_coefficients(int(k))[1] for k in s["renoise/stages"]], s["renoise/beta"]))),
            # The factor's last diagonal entry is the root of a float32 cancellation (the covariance's smallest eigenvalue
            # is the 1e-6 jitter), so a float32 Cholesky gets it only to a few digits, and differently per CPU. What
            # sampling needs is L L^T = cov: that is what is checked.
            CheckResult("block noise cov", "scheduler", max_abs_error(sch.block_noise_covariance, s["block_noise/cov"])),
            CheckResult("block noise factor: L L^T = golden cov", "scheduler", max_abs_error(
                sch.block_noise_scale_tril.double() @ sch.block_noise_scale_tril.double().T, s["block_noise/cov"])),
            CheckResult("cfg stage factors", "scheduler", max_abs_error(sch.cfg_stage_factors, s["cfg/stage_factor"])),
        ]
        grids = sorted({m.group(1, 2) for key in s.files if (m := re.match(r"euler/N(\d+)_shift([\d.]+)/", key))})
        for n, shift in grids:
            errs = []
            for k in range(sch.num_stages):
                prefix = f"euler/N{n}_shift{shift}/stage{k}"
                t = euler_time_grid(int(n), float(shift))
                timesteps = sch.stage_timestep(k, t[:-1], 0.999)
                errs += [max_abs_error(t, s[f"{prefix}/t"]), max_abs_error(timesteps, s[f"{prefix}/Timesteps"]),
                         max_abs_error(timesteps.float(), s[f"{prefix}/Timesteps_fp32"]),
                         max_abs_error(t.float().diff(), s[f"{prefix}/dt_fp32"])]
            rows.append(CheckResult(f"euler grid N={n} shift={shift}", "scheduler", max(errs)))
        return rows

    def check_targets(self) -> list[CheckResult]:
        g = np.load(self.root / "train_targets.npz")
        images = torch.from_numpy(g["images"])
        patch = self.model.patch_size
        rows = []
        for j in range(images.shape[0]):
            p = f"sample{j}/"
            stage, index = int(g[p + "stage"]), torch.tensor([int(g[p + "t_index"])])
            pair = self.schedule.training_pair(images[j:j + 1], stage, index, noise=torch.from_numpy(g[p + "eps"])[None])
            errs = [max_abs_error(pair.x_t[0], g[p + "x_t"]), max_abs_error(pair.target[0], g[p + "target"]),
                    max_abs_error(pair.timestep[0], g[p + "timestep"]),
                    max_abs_error(patchify(pair.x_t[0], patch), g[p + "x_t_tokens"]),
                    max_abs_error(patchify(pair.target[0], patch), g[p + "target_tokens"]),
                    max_abs_error(self.schedule.stage_sides[stage] // patch, g[p + "latent_size"])]
            rows.append(CheckResult(f"training pair sample{j} (stage {stage}, i={index.item()})", "targets", max(errs)))
        return rows

    def _sampler(self, method: str) -> tuple[CascadeSampler, torch.Tensor]:
        st = self.settings
        config = sampler_config(method, list(st["steps_per_stage"]), float(st["shift"]), float(st["guidance_scale"]))
        return CascadeSampler(self.model, self.schedule, config), torch.tensor(st["classes"])

    def _noise(self, g) -> CascadeNoise:
        stages = range(1, self.schedule.num_stages)
        return CascadeNoise(torch.from_numpy(g["noise/init"]), [torch.from_numpy(g[f"noise/stage{k}"]) for k in stages])

    def check_euler(self) -> list[CheckResult]:
        g = np.load(self.root / "sample_euler.npz")
        sampler, labels = self._sampler("euler")
        result = sampler.sample(labels, noise=self._noise(g))
        rows = [CheckResult(f"euler stage{k} final", "euler", max_abs_error(x, g[f"stage{k}/final"]))
                for k, x in enumerate(result.stage_finals)]
        image01 = (result.images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        rows.append(CheckResult("euler output image", "euler", max_abs_error(image01, g["out_image01"])))
        steps = list(self.settings["steps_per_stage"])
        calls_off = max(abs(a - b) for a, b in zip(result.nfe, steps))
        rows.append(CheckResult(f"euler model calls {result.nfe} vs {steps}", "euler_calls", calls_off))
        return rows

    def check_dopri5(self) -> list[CheckResult]:
        """Stage finals and output, each bounded by its measured rounding sensitivity; model calls exactly."""
        g = np.load(self.root / "sample_dopri5.npz")
        sampler, labels = self._sampler("dopri5")

        def outputs(result: SampleOutput) -> list[torch.Tensor]:
            return [*result.stage_finals, result.images]

        noise = self._noise(g)
        result = sampler.sample(labels, noise=noise)
        sensitivity = rounding_sensitivity(lambda n: outputs(sampler.sample(labels, noise=n)), noise, outputs(result))
        names = [f"dopri5 stage{k} final" for k in range(len(result.stage_finals))] + ["dopri5 output"]
        golden = [g[f"stage{k}/final"] for k in range(len(result.stage_finals))] + [g["out"]]
        rows = [CheckResult(name, "dopri5", max_abs_error(x, ref), s)
                for name, x, ref, s in zip(names, outputs(result), golden, sensitivity)]
        expected = [int(n) for n in g["nfe_per_stage"]]
        calls_off = max(abs(a - b) for a, b in zip(result.nfe, expected))
        rows.append(CheckResult(f"dopri5 model calls {result.nfe} vs {expected}", "dopri5_calls", calls_off))
        return rows

    def run_all(self) -> list[CheckResult]:
        with torch.no_grad():  # never flips the caller's global grad mode
            return [*self.check_forward(), *self.check_scheduler(), *self.check_targets(),
                    *self.check_euler(), *self.check_dopri5()]
