"""`python tools/pretrain_demo_backbone.py ...` is `python -m lgm_jax.pretrain_demo ...`."""

import sys

from lgm_jax.pretrain_demo import main

if __name__ == "__main__":
    sys.exit(main())
