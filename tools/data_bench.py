"""`python tools/data_bench.py ...` is `python -m lgm_jax.data_bench ...` (see its --help)."""

import sys

from lgm_jax.data_bench import main

if __name__ == "__main__":
    sys.exit(main())
