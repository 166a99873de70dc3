"""`python tools/benchmark.py ...` is `python -m lgm_jax.benchmark ...` (see its --help)."""

import sys

from lgm_jax.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
