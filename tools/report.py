import sys

from lgm_jax.report import main

if __name__ == "__main__":
    sys.exit(main())
