"""`python tools/convert_weights.py ...` is `python -m lgm_jax.convert ...` (see its --help)."""

import sys

from lgm_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
