"""Checks the text-to-image path against a T2I golden folder of the published implementation.

Layout: ``tests/data/golden_t2i/README.md``. The text encoder's outputs are stored, so no T5 is
needed. The schedule is the published one (1000 train timesteps, gamma -1/3); the image size,
steps, shift and guidance are read from the folder. The folder holds forward and Euler numbers
only, so every row has a fixed bound (:data:`pixelflow.golden.common.TOLERANCES`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.golden.common import CheckResult, load_golden_model, max_abs_error, read_json, require_files, sampler_config
from pixelflow.rope import rope_2d
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler
from pixelflow.text import TextCondition

__all__ = ["GoldenT2IFolder", "is_t2i_folder"]

_FILES = ["model_config.json", "sample_settings.json", "model_forward.npz", "sample_euler.npz"]


def is_t2i_folder(root: str | Path) -> bool:
    """True when ``root/model_config.json`` describes a cross-attention (text) model."""
    path = Path(root) / "model_config.json"
    return path.is_file() and bool(read_json(path).get("constructor", {}).get("cross_attention_dim"))


class GoldenT2IFolder:
    """Loads a T2I golden folder and builds the matching model and schedule."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_t2i_folder(self.root):
            raise FileNotFoundError(f"{self.root} is not a T2I golden folder: model_config.json with a "
                                    "constructor.cross_attention_dim is missing")
        require_files(self.root, _FILES, "tests/data/golden_t2i/README.md")
        self.config = read_json(self.root / "model_config.json")
        self.settings = read_json(self.root / "sample_settings.json")
        self.forward = np.load(self.root / "model_forward.npz")
        self.model = load_golden_model(self.config["constructor"], self.forward)
        self.schedule = CascadeSchedule(image_size=int(self.settings["image_size"]), num_stages=len(self.settings["steps"]))

    def check_forward(self) -> list[CheckResult]:
        f, rows = self.forward, []
        text = TextCondition(torch.from_numpy(f["text/prompt_embeds"]), torch.from_numpy(f["text/attention_mask"]))
        for k in range(self.schedule.num_stages):
            grid = int(f[f"stage{k}/latent_size"][0])
            cos, sin = rope_2d(grid, self.model.head_dim)
            rope = f[f"stage{k}/rope"]
            rope_error = max(max_abs_error(cos, rope[..., 0]), max_abs_error(sin, rope[..., 1]))
            rows.append(CheckResult(f"t2i stage{k} rope", "forward", rope_error))
            v = self.model(torch.from_numpy(f[f"stage{k}/x"]), torch.from_numpy(f[f"stage{k}/timestep"]),
                           text_states=text.states, text_mask=text.mask)
            rows.append(CheckResult(f"t2i stage{k} forward", "forward", max_abs_error(v, f[f"stage{k}/out"])))
        return rows

    def check_euler(self) -> list[CheckResult]:
        g, st = np.load(self.root / "sample_euler.npz"), self.settings
        text = TextCondition(torch.from_numpy(g["prompt_embeds"]), torch.from_numpy(g["attention_mask"]))
        stages = range(1, self.schedule.num_stages)
        noise = CascadeNoise(torch.from_numpy(g["init_noise"]), [torch.from_numpy(g[f"block_noise_stage{k}"]) for k in stages])
        config = sampler_config("euler", list(st["steps"]), float(st["shift"]), float(st["guidance_scale"]))
        result = CascadeSampler(self.model, self.schedule, config).sample(text, noise=noise)
        rows = [CheckResult(f"t2i euler stage{k} final", "euler", max_abs_error(x, g[f"stage{k}_final"]))
                for k, x in enumerate(result.stage_finals)]
        image01 = (result.images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        rows.append(CheckResult("t2i euler output image", "euler", max_abs_error(image01, g["images_nhwc"])))
        steps = list(st["steps"])
        calls_off = max(abs(a - b) for a, b in zip(result.nfe, steps))
        rows.append(CheckResult(f"t2i euler model calls {result.nfe} vs {steps}", "euler_calls", calls_off))
        return rows

    def run_all(self) -> list[CheckResult]:
        with torch.no_grad():  # never flips the caller's global grad mode
            return [*self.check_forward(), *self.check_euler()]
