"""Check pixelflow against a golden folder of the published implementation's numbers.

Usage: python scripts/check_reference.py --golden tests/data/golden
Prints one row per check (max abs error, bound, measured sensitivity for the Dopri5 rows) and exits 0
only if all pass.
"""

import sys

from pixelflow.golden.cli import main

if __name__ == "__main__":
    sys.exit(main())
