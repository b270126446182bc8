"""ImageFolder -> webdataset tar shards of pre-processed images, with an ``index.json``.

    python scripts/make_shards.py data/imagenet/train data/imagenet_shards --workers 16

Files are read in a fixed seeded permutation (shards mix classes), so shard i always holds the
same samples: an interrupted run restarts where it stopped (finished shards are kept, a partial
shard is rewritten; every file is written under a temporary name and renamed when complete).
Each image gets the deterministic part of the augmentation (``--crop random``: short side to
288 for 256 px, Lanczos; ``--crop adm``: ADM centre crop) and is stored as JPEG or PNG bytes;
random crops and flips happen at training time. Unreadable files are reported and counted in
the index, never fatal.

Text-to-image: ``--captions`` reads a caption folder instead (every image with a same-name ``.txt``
beside it, any depth; :mod:`pixelflow.data.caption_folder`) and stores each caption as ``<key>.txt``:

    python scripts/make_shards.py data/captions data/caption_shards --captions --image-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelflow.data.caption_folder import caption_pairs, read_caption  # noqa: E402
from pixelflow.data.imagenet import CROPS, default_resize, deterministic_transform, imagenet_class_names  # noqa: E402
from pixelflow.data.robust import UNREADABLE_ERRORS, open_rgb  # noqa: E402
from pixelflow.data.shards import INDEX_FORMAT  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder root: src/<class>/<image>")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar and index.json")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop", choices=CROPS, default="random", help="random: store short side 9/8 x size; adm: ADM centre crop")
    p.add_argument("--resize-size", type=int, default=None, help="short side stored for --crop random (default 9/8 x size)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="source files per shard")
    p.add_argument("--workers", type=int, default=0, help="decode/encode processes (0: in this process)")
    p.add_argument("--seed", type=int, default=0, help="file order permutation (fixed so that resuming is exact)")
    p.add_argument("--captions", action="store_true",
                   help="src holds images with same-name .txt captions (any depth), not class folders; store <key>.txt")
    return p.parse_args(argv)


def encode(job: tuple[str, int, str, dict, bool]) -> tuple[str, int | str, bytes | None, str | None]:
    """(path, label or caption, image bytes or None, error or None) for one source file."""
    path, label, fmt, opts, captions = job
    try:
        if captions:
            label = read_caption(Path(path).with_suffix(".txt"))
        image = deterministic_transform(opts["image_size"], opts["crop"], opts["resize_size"])(open_rgb(path))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": opts["quality"]} if fmt == "jpg" else {}))
        return path, label, buffer.getvalue(), None
    except UNREADABLE_ERRORS as err:
        return path, label, None, f"{type(err).__name__}: {err}"


def write_shard(tar_path: Path, results: Iterator, first_key: int, fmt: str, src: Path, progress: tqdm) -> dict:
    """Write one shard under a temporary name, then its stats, then rename; return the stats."""
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    count, skipped = 0, []
    with wds.TarWriter(str(tmp)) as sink:
        for offset, (path, label, data, error) in enumerate(results):
            progress.update(1)
            if data is None:
                skipped.append({"path": str(Path(path).relative_to(src)), "error": error})
                progress.write(f"[make_shards] skipping unreadable {path}: {error}")
                continue
            rel = str(Path(path).relative_to(src))
            target = {"txt": label} if isinstance(label, str) else {"cls": label}
            sink.write({"__key__": f"{first_key + offset:09d}", fmt: data, **target, "json": {"path": rel}})
            count += 1
    stats = {"path": tar_path.name, "count": count, "skipped": skipped}
    _atomic_write_json(tar_path.with_suffix(".json"), stats)
    os.replace(tmp, tar_path)
    return stats


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def make_shards(args: argparse.Namespace) -> dict:
    """Write (or finish writing) all shards and the index; return the index."""
    src, out = Path(args.src), Path(args.out)
    if args.captions:
        classes, samples = [], [(str(image), -1) for image, _ in caption_pairs(src)]
    else:
        classes, class_to_idx = find_classes(src)
        samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS)
    random.Random(args.seed).shuffle(samples)
    out.mkdir(parents=True, exist_ok=True)
    opts = {"image_size": args.image_size, "crop": args.crop, "quality": args.quality,
            "resize_size": (args.resize_size or default_resize(args.image_size)) if args.crop == "random" else None}
    settings = {**opts, "format": args.format, "shard_size": args.shard_size, "seed": args.seed, "files": len(samples),
                **({"captions": True} if args.captions else {})}
    settings_path = out / "make_shards.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise SystemExit(f"{out} holds shards written with other settings ({settings_path}); use a new folder")
    _atomic_write_json(settings_path, settings)
    num_shards = (len(samples) + args.shard_size - 1) // args.shard_size
    shards: list[dict] = [{}] * num_shards
    todo: list[int] = []
    for i in range(num_shards):
        tar_path, stats_path = out / f"shard-{i:06d}.tar", out / f"shard-{i:06d}.json"
        if tar_path.is_file() and stats_path.is_file():
            shards[i] = json.loads(stats_path.read_text())
        else:
            todo.append(i)
    done_files = sum(min(args.shard_size, len(samples) - i * args.shard_size) for i in set(range(num_shards)) - set(todo))
    if done_files:
        print(f"[make_shards] resuming: {num_shards - len(todo)} of {num_shards} shards already written")
    with Pool(args.workers) if args.workers > 0 else nullcontext() as pool, \
            tqdm(total=len(samples), initial=done_files, unit="img", desc="shards") as progress:
        for i in todo:
            chunk = samples[i * args.shard_size:(i + 1) * args.shard_size]
            jobs = [(path, label, args.format, opts, args.captions) for path, label in chunk]
            results = pool.imap(encode, jobs, chunksize=8) if pool else map(encode, jobs)
            shards[i] = write_shard(out / f"shard-{i:06d}.tar", results, i * args.shard_size, args.format, src, progress)
    skipped = [s for shard in shards for s in shard["skipped"]]
    index = {
        "format": INDEX_FORMAT,
        "source": str(src.resolve()),
        "preprocess": {"image_size": args.image_size, **{k: v for k, v in opts.items() if k != "image_size"},
                       "format": args.format, "seed": args.seed},
        "classes": classes,
        "class_names": imagenet_class_names(classes),
        "captions": args.captions,
        "num_classes": len(classes),
        "shards": [{"path": s["path"], "count": s["count"]} for s in shards],
        "total": sum(s["count"] for s in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    _atomic_write_json(out / "index.json", index)
    print(f"[make_shards] {index['total']} images in {num_shards} shards under {out}; "
          f"{len(skipped)} unreadable file(s) skipped" + (" (listed in index.json)" if skipped else ""))
    return index


if __name__ == "__main__":
    make_shards(parse_args())
