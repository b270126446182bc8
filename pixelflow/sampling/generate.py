"""Sample generation at any scale: balanced labels or prompts, one seed per sample index, resumable shards.

Sample i gets label ``classes[i % len(classes)]`` (text-to-image: prompt ``prompts[i % len(prompts)]``
and that prompt's label, -1 without one) and its own noise seed ``seed * 10**7 + i`` (:mod:`pixelflow.sampling.indexed`),
so with Euler/Heun/AB2 its image does not depend on batch size or device count. Every finished
batch is written atomically as a shard; a restarted run skips finished indices, and the final
``samples.npz`` (ADM layout) is assembled only when all N indices are present exactly once.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from tqdm.auto import tqdm

from pixelflow.atomic import atomic_save_npz, atomic_write_text
from pixelflow.checkpoint import LoadedModel
from pixelflow.conditioning import Conditioning
from pixelflow.images import save_grid, save_pngs
from pixelflow.metrics.io import write_adm_npz
from pixelflow.precision import resolve_precision
from pixelflow.sampling.call_counter import CallCounter
from pixelflow.sampling.compile import compile_loaded
from pixelflow.sampling.indexed import balanced_labels, sample_uint8
from pixelflow.sampling.memory import check_sampling_fits
from pixelflow.sampling.prompts import PromptSet, load_text_encoder
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig

__all__ = ["SHARD_DIR", "finished_indices", "generate", "assemble", "device_memory_bytes"]

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"


def finished_indices(shard_dir: Path) -> set[int]:
    """Sample indices already in readable shards of ``shard_dir``. Shards are written atomically, so an unreadable
    one is damage from outside (it is deleted and its samples made again); a killed write leaves only a hidden
    ``.partial`` temporary, which no shard glob matches and which is removed here."""
    for leftover in shard_dir.glob(".shard_*.partial"):
        leftover.unlink(missing_ok=True)
    done: set[int] = set()
    for shard in sorted(shard_dir.glob("shard_*.npz")):
        try:
            with np.load(shard, allow_pickle=False) as data:
                done.update(int(i) for i in data["indices"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            logger.warning("ignoring unreadable shard %s (interrupted write?); its samples will be regenerated", shard)
            shard.unlink()
    return done


def _write_shard(shard_dir: Path, indices: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
    atomic_save_npz(shard_dir / f"shard_{int(indices[0]):07d}.npz", indices=indices.numpy(), images=images.numpy(),
                    labels=labels.numpy())


def assemble(out_dir: Path, num_samples: int, settings: dict) -> Path:
    """Merge shards into ``samples.npz``; fail loudly on gaps or duplicates.

    Shards are streamed into place in a memory-mapped array (one shard in RAM at a time), which
    ``np.savez`` then copies into the archive in chunks: never more than one copy of the images.
    """
    shards = sorted((out_dir / SHARD_DIR).glob("shard_*.npz"))
    indices = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as data:
            indices.append(data["indices"])
    index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    unique = np.unique(index)
    if len(unique) != len(index) or not np.array_equal(unique, np.arange(num_samples)):
        raise RuntimeError(f"shards in {out_dir / SHARD_DIR} hold {len(index)} samples ({len(unique)} unique) "
                           f"instead of indices 0..{num_samples - 1}; rerun sample.py to fill the gaps")
    with np.load(shards[0], allow_pickle=False) as data:
        shape = data["images"].shape[1:]
    staging = out_dir / SHARD_DIR / "assembling.npy"
    images = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8, shape=(num_samples, *shape))
    labels = np.empty(num_samples, dtype=np.int64)
    for shard, shard_index in zip(shards, indices):
        with np.load(shard, allow_pickle=False) as data:
            images[shard_index] = data["images"]
            labels[shard_index] = data["labels"]
    try:
        return write_adm_npz(out_dir / "samples.npz", images, labels, settings)
    finally:
        del images
        staging.unlink()


def device_memory_bytes(device: torch.device, override_gib: float | None = None) -> float | None:
    """Memory to size batches against: ``override_gib`` if given, else a CUDA device's total, else None."""
    if override_gib is not None:
        return override_gib * 2**30
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _calls_per_image(out_dir: Path, rows: float, made: float) -> float | None:
    """Network rows per image of the samples made now; of the earlier run's when a resumed run made none."""
    if made:
        return rows / made
    earlier = out_dir / "sampling.json"
    return json.loads(earlier.read_text()).get("model_calls_per_image") if earlier.is_file() else None


def _check_conditions(loaded: LoadedModel, classes: list[int] | None, prompts: PromptSet | None) -> list[int] | None:
    """The class list of a class-to-image model (None for text); clear errors for the wrong kind of condition."""
    model = loaded.model
    if model.cross_attention_dim:
        if prompts is None:
            raise ValueError(f"{loaded.source} is a text-to-image checkpoint: pass prompts='[a handwritten seven,the digit 3]' "
                             "or prompts_file=PATH (one prompt per line, optionally label<TAB>prompt)")
        if classes is not None:
            raise ValueError(f"{loaded.source} is a text-to-image checkpoint: it takes prompts, not classes=; "
                             "put a target label in the prompts file (label<TAB>prompt) instead")
        return None
    if prompts is not None:
        raise ValueError(f"{loaded.source} is a class-to-image checkpoint: it takes classes=, not prompts")
    classes = list(range(model.num_classes)) if classes is None else [int(c) for c in classes]
    if not classes or min(classes) < 0 or max(classes) >= model.num_classes:
        raise ValueError(f"classes must be ids in [0, {model.num_classes - 1}], got {classes}")
    return classes


def generate(loaded: LoadedModel, config: SamplerConfig, out_dir: str | Path, num_samples: int, batch_size: int,
             seed: int = 0, classes: list[int] | None = None, save_png: bool = True, fabric: Fabric | None = None,
             precision: str = "auto", device_memory_gib: float | None = None, prompts: PromptSet | None = None,
             negative_prompt: str = "", text_encoder: str | None = None, compile: bool = False) -> Path:
    """Generate ``num_samples`` images into ``out_dir`` (shards, PNGs, grid.png, samples.npz); resumable.

    A text-to-image checkpoint takes ``prompts`` (cycled over the samples; the unconditional branch
    encodes ``negative_prompt``) and encodes them with its config's text encoder, or ``text_encoder``
    (a folder or Hugging Face name) if given. ``precision``: see :mod:`pixelflow.precision` (bf16 also
    runs the text encoder in bf16). A batch the memory model (:mod:`pixelflow.sampling.memory`) says
    will not fit the device (``device_memory_gib``, default a CUDA device's total memory; unchecked on
    CPU; a text encoder on the device counted) is refused before any sampling, and before ``compile``
    (:func:`pixelflow.sampling.compile.compile_loaded` for the batches still to make; its time logged apart).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    model, schedule = loaded.model, loaded.schedule
    classes = _check_conditions(loaded, classes, prompts)
    config.stage_steps(schedule.num_stages)  # a wrong per-stage length fails before anything loads
    fabric = fabric or Fabric(accelerator="auto", devices=1)
    precision = resolve_precision(precision, fabric.device)
    encoder = None if prompts is None else load_text_encoder(
        loaded, text_encoder, fabric.device, torch.bfloat16 if precision == "bf16" else torch.float32)
    device_bytes = device_memory_bytes(fabric.device, device_memory_gib)
    if device_bytes is not None:
        text = {} if encoder is None else dict(text_length=encoder.max_length, encoder_bytes=encoder.device_bytes())
        check_sampling_fits(model, schedule.image_size, min(batch_size, num_samples), config.method, precision,
                            device_bytes, guided=config.guidance_scale > 1, steps=config.steps, **text)
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    if fabric.is_global_zero:
        shard_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()

    labels = None if classes is None else balanced_labels(num_samples, classes)
    done = finished_indices(shard_dir) if fabric.is_global_zero else set()
    done = fabric.broadcast(done, src=0)
    todo = torch.tensor(sorted(set(range(num_samples)) - done), dtype=torch.long)
    batches = [b for i, b in enumerate(todo.split(batch_size)) if i % fabric.world_size == fabric.global_rank]
    if fabric.is_global_zero and done:
        logger.info("resuming: %d of %d samples already in %s", len(done), num_samples, shard_dir)

    model = model.to(fabric.device).eval()
    if compile and batches:
        model = compile_loaded(replace(loaded, model=model), [config], {len(b) for b in batches}, fabric.device,
                               precision)[0].model
    counter = CallCounter(model)  # network rows, for the model calls per image
    sampler = CascadeSampler(counter, schedule, config)

    def condition_of(indices: torch.Tensor) -> Conditioning | torch.Tensor:
        if encoder is None:
            return labels[indices]
        return encoder.condition(prompts.for_indices(indices.tolist())[0], negative_prompt).to(fabric.device, torch.float32)

    # tqdm's rate and ETA are in images (this rank's), so they read as images/s and time to finish.
    progress = tqdm(total=sum(len(b) for b in batches), desc=f"sampling ({precision})", unit="img",
                    disable=not fabric.is_global_zero)
    for indices in batches:
        images = sample_uint8(sampler, condition_of, indices, seed, batch_size, precision)
        batch_labels = labels[indices] if encoder is None else prompts.for_indices(indices.tolist())[1]
        _write_shard(shard_dir, indices, images, batch_labels)
        if save_png:
            save_pngs(images, batch_labels, indices, out_dir / "images")
        progress.update(len(indices))
    progress.close()
    rows, made = fabric.all_reduce(torch.tensor([counter.rows, sum(len(b) for b in batches)], dtype=torch.float64,
                                                device=fabric.device), reduce_op="sum").tolist()
    fabric.barrier()

    settings = {"sampler": asdict(config), "seed": seed, "num_samples": num_samples, "classes": classes,
                "checkpoint": loaded.source, "image_size": schedule.image_size, "precision": precision,
                "model_calls_per_image": _calls_per_image(out_dir, rows, made)}
    if prompts is not None:
        settings |= {"prompts": list(prompts.prompts), "prompt_labels": list(prompts.labels),
                     "negative_prompt": negative_prompt, "text_encoder": text_encoder or (loaded.text_encoder or {}).get("source")}
    if fabric.is_global_zero:
        path = assemble(out_dir, num_samples, settings)
        atomic_write_text(out_dir / "sampling.json", json.dumps(settings, indent=2))
        with np.load(path, allow_pickle=False) as data:
            first = torch.from_numpy(data["arr_0"][: min(num_samples, 100)])
        kinds = len(classes) if classes is not None else len(prompts.prompts)
        nrow = min(kinds, 10) if num_samples >= min(kinds, 10) else num_samples
        save_grid(first, out_dir / "grid.png", nrow=nrow, upscale=max(1, 128 // schedule.image_size))
        logger.info("wrote %d samples: %s, sample grid %s; %s model calls (network rows) per image", num_samples, path,
                    out_dir / "grid.png", settings["model_calls_per_image"])
    fabric.barrier()
    return out_dir / "samples.npz"
