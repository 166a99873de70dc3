import sys

from lgm_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
