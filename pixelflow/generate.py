"""Sample generation at any scale: balanced labels, one seed per sample index, resumable shards.

Sample i gets label ``classes[i % len(classes)]`` and its own noise seed ``seed * 10**7 + i``,
so with Euler/Heun its image does not depend on batch size or device count. Every finished
batch is written atomically as a shard; a restarted run skips finished indices, and the final
``samples.npz`` (ADM layout) is assembled only when all N indices are present exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from pixelflow.checkpoint import LoadedModel
from pixelflow.images import save_adm_npz, save_grid, save_pngs
from pixelflow.samplers import CascadeNoise, CascadeSampler, SamplerConfig, to_uint8

__all__ = ["balanced_labels", "sample_seed", "generate", "assemble"]

SHARD_DIR = "shards"


def balanced_labels(num_samples: int, classes: list[int]) -> torch.Tensor:
    """Label of every sample index: classes cycled, so counts differ by at most one."""
    return torch.tensor(classes)[torch.arange(num_samples) % len(classes)]


def sample_seed(seed: int, index: int) -> int:
    return seed * 10_000_000 + index


def _finished_indices(shard_dir: Path) -> set[int]:
    done: set[int] = set()
    for shard in sorted(shard_dir.glob("shard_*.npz")):
        try:
            with np.load(shard, allow_pickle=False) as data:
                done.update(int(i) for i in data["indices"])
        except (OSError, ValueError, KeyError, EOFError):
            print(f"[pixelflow] ignoring unreadable shard {shard} (interrupted write?); its samples will be regenerated")
            shard.unlink()
    return done


def _write_shard(shard_dir: Path, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
    path = shard_dir / f"shard_{int(indices[0]):07d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, indices=indices.numpy(), images=images.numpy(), labels=labels.numpy())
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written shard


def assemble(out_dir: Path, num_samples: int, settings: dict) -> Path:
    """Merge shards into ``samples.npz``; fail loudly on gaps or duplicates."""
    shards = sorted((out_dir / SHARD_DIR).glob("shard_*.npz"))
    indices, images, labels = [], [], []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as data:
            indices.append(data["indices"])
            images.append(data["images"])
            labels.append(data["labels"])
    index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    unique = np.unique(index)
    if len(unique) != len(index) or not np.array_equal(unique, np.arange(num_samples)):
        raise RuntimeError(f"shards in {out_dir / SHARD_DIR} hold {len(index)} samples ({len(unique)} unique) "
                           f"instead of indices 0..{num_samples - 1}; rerun sample.py to fill the gaps")
    order = np.argsort(index)
    return save_adm_npz(out_dir / "samples.npz", np.concatenate(images)[order], np.concatenate(labels)[order], settings)


def generate(loaded: LoadedModel, config: SamplerConfig, out_dir: str | Path, num_samples: int, batch_size: int,
             seed: int = 0, classes: list[int] | None = None, save_png: bool = True, fabric: Fabric | None = None) -> Path:
    """Generate ``num_samples`` images into ``out_dir`` (shards, PNGs, grid, samples.npz); resumable."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    model, schedule = loaded.model, loaded.schedule
    classes = list(range(model.num_classes)) if classes is None else [int(c) for c in classes]
    if not classes or min(classes) < 0 or max(classes) >= model.num_classes:
        raise ValueError(f"classes must be ids in [0, {model.num_classes - 1}], got {classes}")
    config.validate(schedule.num_stages)
    fabric = fabric or Fabric(accelerator="auto", devices=1)
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    if fabric.is_global_zero:
        shard_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()

    labels = balanced_labels(num_samples, classes)
    done = _finished_indices(shard_dir) if fabric.is_global_zero else set()
    done = fabric.broadcast(done, src=0)
    todo = torch.tensor(sorted(set(range(num_samples)) - done), dtype=torch.long)
    batches = [b for i, b in enumerate(todo.split(batch_size)) if i % fabric.world_size == fabric.global_rank]
    if fabric.is_global_zero and done:
        print(f"[pixelflow] resuming: {len(done)} of {num_samples} samples already in {shard_dir}")

    model = model.to(fabric.device).eval()
    sampler = CascadeSampler(model, schedule, config)
    doubled = config.method == "dopri5"
    for indices in tqdm(batches, desc="sampling", unit="batch", disable=not fabric.is_global_zero):
        noise = CascadeNoise.per_sample(schedule, [sample_seed(seed, i) for i in indices.tolist()], model.in_channels,
                                        doubled, device=fabric.device)
        batch_labels = labels[indices]
        images = to_uint8(sampler.sample(batch_labels, noise=noise).images)
        _write_shard(shard_dir, indices, images, batch_labels)
        if save_png:
            save_pngs(images, batch_labels, indices, out_dir / "images")
    fabric.barrier()

    settings = {"sampler": asdict(config), "seed": seed, "num_samples": num_samples, "classes": classes,
                "checkpoint": loaded.source, "image_size": schedule.image_size}
    if fabric.is_global_zero:
        path = assemble(out_dir, num_samples, settings)
        (out_dir / "sampling.json").write_text(json.dumps(settings, indent=2))
        with np.load(path, allow_pickle=False) as data:
            first = torch.from_numpy(data["arr_0"][: min(num_samples, 100)])
        nrow = min(len(classes), 10) if num_samples >= min(len(classes), 10) else num_samples
        save_grid(first, out_dir / "grid.png", nrow=nrow, upscale=max(1, 128 // schedule.image_size))
        print(f"[pixelflow] wrote {num_samples} samples: {path}, grid {out_dir / 'grid.png'}")
    fabric.barrier()
    return out_dir / "samples.npz"
