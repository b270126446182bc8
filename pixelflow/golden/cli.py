"""The reference check's command line: picks the class- or text-to-image check for a golden folder and reports it."""

from __future__ import annotations

import argparse
import sys

from pixelflow.golden.c2i import GoldenFolder
from pixelflow.golden.common import report
from pixelflow.golden.t2i import GoldenT2IFolder, is_t2i_folder

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Print one row per check (max abs error, bound, measured sensitivity where used); exit 0 only if all pass."""
    parser = argparse.ArgumentParser(description="Check pixelflow against a golden folder of the published implementation.")
    parser.add_argument("--golden", required=True, help="folder laid out as tests/data/golden{,_t2i}/README.md")
    args = parser.parse_args(argv)
    folder = GoldenT2IFolder(args.golden) if is_t2i_folder(args.golden) else GoldenFolder(args.golden)
    return report(folder.run_all())


if __name__ == "__main__":
    sys.exit(main())
