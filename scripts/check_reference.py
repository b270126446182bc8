"""Check pixelflow against a golden folder of the published implementation's numbers.

Usage: python scripts/check_reference.py --golden tests/data/golden
Prints one row per check (max abs error, tolerance) and exits 0 only if all pass.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelflow.golden import GoldenFolder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", required=True, help="folder laid out as tests/data/golden/README.md")
    args = parser.parse_args()
    results = GoldenFolder(args.golden).run_all()
    width = max(len(r.name) for r in results)
    print(f"{'check':<{width}}  {'max abs err':>12}  {'tolerance':>10}  result")
    for r in results:
        print(f"{r.name:<{width}}  {r.error:>12.3e}  {r.tolerance:>10.1e}  {'PASS' if r.passed else 'FAIL'}")
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
