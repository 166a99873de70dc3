"""`python tools/golden_check.py ...` is `python -m lgm_jax.golden ...` (see its --help)."""

import sys

from lgm_jax.golden import main

if __name__ == "__main__":
    sys.exit(main())
