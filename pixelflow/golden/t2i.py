"""Checks the text-to-image path against a T2I golden folder of the published implementation.

Layout: ``tests/data/golden_t2i/README.md``. The text encoder's outputs are stored, so no T5 is
needed. The schedule is the published one (1000 train timesteps, gamma -1/3); the image size,
steps, shift and guidance are read from the folder. Tolerances are the c2i groups of
:data:`pixelflow.golden.c2i.TOLERANCES`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.golden.c2i import CheckResult, _err
from pixelflow.model import PixelFlowTransformer
from pixelflow.rope import rope_2d
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition

__all__ = ["GoldenT2IFolder", "is_t2i_folder"]


def is_t2i_folder(root: str | Path) -> bool:
    """True when ``root/model_config.json`` describes a cross-attention (text) model."""
    path = Path(root) / "model_config.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("constructor", {}).get("cross_attention_dim"))


class GoldenT2IFolder:
    """Loads a T2I golden folder and builds the matching model and schedule."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not is_t2i_folder(self.root):
            raise FileNotFoundError(f"{self.root} is not a T2I golden folder: model_config.json with a "
                                    "constructor.cross_attention_dim is missing")
        self.config = json.loads((self.root / "model_config.json").read_text())
        self.settings = json.loads((self.root / "sample_settings.json").read_text())
        self.forward = np.load(self.root / "model_forward.npz")
        self.model = PixelFlowTransformer(**self.config["constructor"]).eval()
        params = {k[len("param/"):]: torch.from_numpy(self.forward[k]) for k in self.forward.files if k.startswith("param/")}
        self.model.load_state_dict(params, strict=True)
        self.schedule = CascadeSchedule(image_size=int(self.settings["image_size"]), num_stages=len(self.settings["steps"]))

    def check_forward(self) -> list[CheckResult]:
        f, rows = self.forward, []
        text = TextCondition(torch.from_numpy(f["text/prompt_embeds"]), torch.from_numpy(f["text/attention_mask"]))
        for k in range(self.schedule.num_stages):
            grid = int(f[f"stage{k}/latent_size"][0])
            cos, sin = rope_2d(grid, self.model.head_dim)
            rope = f[f"stage{k}/rope"]
            rows.append(CheckResult(f"t2i stage{k} rope", "forward", max(_err(cos, rope[..., 0]), _err(sin, rope[..., 1]))))
            v = self.model(torch.from_numpy(f[f"stage{k}/x"]), torch.from_numpy(f[f"stage{k}/timestep"]),
                           text_states=text.states, text_mask=text.mask)
            rows.append(CheckResult(f"t2i stage{k} forward", "forward", _err(v, f[f"stage{k}/out"])))
        return rows

    def check_euler(self) -> list[CheckResult]:
        g, st = np.load(self.root / "sample_euler.npz"), self.settings
        text = TextCondition(torch.from_numpy(g["prompt_embeds"]), torch.from_numpy(g["attention_mask"]))
        stages = range(1, self.schedule.num_stages)
        noise = CascadeNoise(torch.from_numpy(g["init_noise"]), [torch.from_numpy(g[f"block_noise_stage{k}"]) for k in stages])
        config = SamplerConfig(method="euler", steps=list(st["steps"]), shift=float(st["shift"]),
                               guidance_scale=float(st["guidance_scale"]))
        result = CascadeSampler(self.model, self.schedule, config).sample(text, noise=noise)
        rows = [CheckResult(f"t2i euler stage{k} final", "euler", _err(x, g[f"stage{k}_final"]))
                for k, x in enumerate(result.stage_finals)]
        image01 = (result.images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        rows.append(CheckResult("t2i euler output image", "euler", _err(image01, g["images_nhwc"])))
        steps = list(st["steps"])
        calls_off = max(abs(a - b) for a, b in zip(result.nfe, steps))
        rows.append(CheckResult(f"t2i euler model calls {result.nfe} vs {steps}", "euler_calls", calls_off))
        return rows

    def run_all(self) -> list[CheckResult]:
        with torch.no_grad():  # never flips the global grad mode of a caller (e.g. a test session)
            return [*self.check_forward(), *self.check_euler()]
