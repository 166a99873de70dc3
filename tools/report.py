"""`python tools/report.py ...` is `python -m lgm_jax.report ...` (see its --help)."""

import sys

from lgm_jax.report import main

if __name__ == "__main__":
    sys.exit(main())
