"""``python -m bench``: the pgbench side-by-side comparison (see bench/README.md)."""

import sys

from bench.pgbench_compare import main

if __name__ == "__main__":
    sys.exit(main())
