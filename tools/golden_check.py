import sys

from lgm_jax.golden import main

if __name__ == "__main__":
    sys.exit(main())
