import sys

from lgm_jax.data_bench import main

if __name__ == "__main__":
    sys.exit(main())
