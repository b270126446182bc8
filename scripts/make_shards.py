"""ImageFolder -> webdataset tar shards of pre-processed images, with an ``index.json``.

    python scripts/make_shards.py data/imagenet/train data/imagenet_shards --workers 16

Resumable: rerun the same command after an interruption. Unreadable files are reported and counted in the
index, never fatal. Text-to-image: ``--captions`` reads a caption folder instead (every image with a same-name
``.txt`` beside it, any depth) and stores each caption as ``<key>.txt``:

    python scripts/make_shards.py data/captions data/caption_shards --captions --image-size 256

How the shards are written: pixelflow/data/shard_writer.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pixelflow.data.imagenet import CROPS
from pixelflow.data.shard_writer import IMAGE_FORMATS, ShardSettings, write_shards


def parse_args(argv: list[str] | None = None) -> ShardSettings:
    d = ShardSettings(src=Path(), out=Path())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="ImageFolder root: src/<class>/<image>")
    p.add_argument("out", type=Path, help="output folder for shard-NNNNNN.tar and index.json")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--crop", choices=CROPS, default=d.crop, help="random: store short side 9/8 x size; adm: ADM centre crop")
    p.add_argument("--resize-size", type=int, default=d.resize_size, help="short side stored for --crop random (default 9/8 x size)")
    p.add_argument("--format", choices=IMAGE_FORMATS, default=d.format)
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="source files per shard")
    p.add_argument("--workers", type=int, default=d.workers, help="decode/encode processes (0: in this process)")
    p.add_argument("--seed", type=int, default=d.seed, help="file order permutation (fixed so that resuming is exact)")
    p.add_argument("--captions", action="store_true",
                   help="src holds images with same-name .txt captions (any depth), not class folders; store <key>.txt")
    try:
        return ShardSettings(**vars(p.parse_args(argv)))
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[make_shards] %(message)s")
    try:
        with logging_redirect_tqdm():  # messages above the progress bar, not through it
            write_shards(settings)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
