"""Command line: `python -m lgm_jax.main --config=configs/in100.py --workdir=DIR [--config.x=y]`.

Parses flags and calls `distill.run`; nothing else. A mistake the user can fix (an unknown config
key or backbone, a workdir holding another run, missing data or weights) ends with one line
saying what is wrong, not a traceback.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from lgm_jax import config_base, distill

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_overrides(argv) -> list[str]:
    """The `--config.a.b=...` overrides that name no key of the base config."""
    known = config_base.base()
    bad = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node = known
        for part in arg[len("--config.") :].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                bad.append(arg.split("=", 1)[0][2:])
                break
            node = node[part]
    return bad


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from lgm_jax.models.weights import CheckpointMismatch

    try:
        distill.run(_CONFIG.value, _WORKDIR.value)
    except (distill.RunMismatch, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        logging.error("error: %s", e)
        sys.exit(2)
    except distill.NonFiniteLoss as e:
        logging.error("error: %s", e)
        sys.exit(3)


if __name__ == "__main__":
    bad = unknown_overrides(sys.argv[1:])
    if bad:
        sys.exit(
            f"error: unknown config key(s): {', '.join(bad)}. "
            "The keys and their meaning are in lgm_jax/config_base.py."
        )
    app.run(main)
