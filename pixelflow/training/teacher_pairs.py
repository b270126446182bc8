"""A teacher's ODE solutions as distillation targets: every stage's start and end state for many noises.

The teacher samples the whole cascade with its own sampler (any method, guidance included); a sample's
stage-k *end* is the teacher's final latent of stage k, and its stage-k *start* is where the cascade enters
stage k: the first noise at stage 0, else the published transition (upsample and renoise) of the teacher's
stage k-1 end. Only the ends and each sample's noise seed are stored: the starts are recomputed from them
(:func:`stage_starts`), exactly as the sampler made them. Shards are written atomically; a restarted
generation makes only the missing ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelflow.atomic import atomic_save_npz, atomic_write_text
from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import LoadedModel
from pixelflow.sampling.indexed import balanced_labels, sample_seed
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig

__all__ = ["PAIRS_FILE", "write_teacher_pairs", "read_teacher_pairs", "stage_starts", "TeacherPairs"]

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.json"  # what made the shards beside it: a folder made by other settings is refused


def stage_starts(schedule: CascadeSchedule, ends: list[torch.Tensor], seeds: list[int], channels: int) -> list[torch.Tensor]:
    """Each stage's start state for samples with noise ``seeds`` whose stage ends are ``ends`` (the sampler's
    draws for those seeds: stage 0 starts at the first noise, stage k at the transition of stage k-1's end)."""
    noise = CascadeNoise.per_sample(schedule, seeds, channels, doubled=False, device=ends[0].device)
    return [noise.init, *(schedule.transition(ends[k - 1], k, noise.transitions[k - 1]) for k in range(1, len(ends)))]


def _settings(teacher: LoadedModel, sampler: SamplerConfig, num_pairs: int, seed: int) -> dict[str, Any]:
    return {"teacher": teacher.source, "sampler": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(sampler).items()},
            "num_pairs": num_pairs, "seed": seed, "num_stages": teacher.schedule.num_stages,
            "image_size": teacher.schedule.image_size}


def write_teacher_pairs(teacher: LoadedModel, sampler: SamplerConfig, out_dir: str | Path, num_pairs: int,
                        batch_size: int, seed: int, device: torch.device | str = "cpu") -> Path:
    """Sample ``num_pairs`` cascades from ``teacher`` into shards of ``out_dir`` (pair i: label i % classes, noise
    seed ``seed * 10**7 + i``); resumable. Returns ``out_dir``."""
    if num_pairs < 1 or batch_size < 1:
        raise ValueError(f"num_pairs and batch_size must be >= 1, got {num_pairs} and {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(teacher, sampler, num_pairs, seed)
    meta = out / PAIRS_FILE
    if meta.is_file() and json.loads(meta.read_text()) != settings:
        raise ValueError(f"{out} holds teacher pairs made with other settings ({meta}); delete the folder or point the "
                         "run at another one (data.pairs_dir=...) to make them again")
    atomic_write_text(meta, json.dumps(settings, indent=2))
    labels = balanced_labels(num_pairs, list(range(teacher.model.num_classes)))
    done = {int(p.stem.split("_")[1]) for p in out.glob("shard_*.npz")}
    model = teacher.model.to(device).eval()
    sampler_ = CascadeSampler(model, teacher.schedule, sampler)
    made = 0
    for first in range(0, num_pairs, batch_size):
        if first in done:
            continue
        made += min(batch_size, num_pairs - first)
        index = torch.arange(first, min(first + batch_size, num_pairs))
        seeds = [sample_seed(seed, i) for i in index.tolist()]
        ends = sampler_.sample(labels[index].to(device), seeds=seeds).stage_finals
        atomic_save_npz(out / f"shard_{first:07d}.npz", indices=index.numpy(), labels=labels[index].numpy(),
                        seeds=np.asarray(seeds, dtype=np.int64), **{f"end{k}": e.cpu().numpy() for k, e in enumerate(ends)})
    logger.info("teacher pairs: %d in %s (%d made now)", num_pairs, out, made)
    return out


def read_teacher_pairs(folder: str | Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(settings, labels (N,), seeds (N,), stage ends [(N, C, s_k, s_k)]) of a finished pairs folder, in index order."""
    folder = Path(folder)
    meta = folder / PAIRS_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} holds no teacher pairs ({PAIRS_FILE} missing); make them with write_teacher_pairs")
    settings = json.loads(meta.read_text())
    parts: dict[str, list[np.ndarray]] = {}
    for shard in sorted(folder.glob("shard_*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            for key in data.files:
                parts.setdefault(key, []).append(data[key])
    index = np.concatenate(parts.get("indices", [np.zeros(0, dtype=np.int64)]))
    if not np.array_equal(index, np.arange(settings["num_pairs"])):
        raise ValueError(f"{folder} holds {len(index)} of {settings['num_pairs']} teacher pairs (an interrupted "
                         "generation): rerun the training command to make the rest")
    ends = [torch.from_numpy(np.concatenate(parts[f"end{k}"])) for k in range(settings["num_stages"])]
    return settings, torch.from_numpy(np.concatenate(parts["labels"])), torch.from_numpy(np.concatenate(parts["seeds"])), ends


class TeacherPairs(Dataset):
    """Teacher pairs as a dataset: item i is (stage ends of pair i, its label, its noise seed)."""

    def __init__(self, folder: str | Path):
        self.settings, self.labels, self.seeds, self.ends = read_teacher_pairs(folder)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, int]:
        return [e[index] for e in self.ends], int(self.labels[index]), int(self.seeds[index])
