"""Command line: `python -m lgm_jax.main --config=configs/in100.py --workdir=DIR [--config.x=y]`."""

import logging

from absl import app, flags
from ml_collections import config_flags

from lgm_jax import distill

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    distill.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
