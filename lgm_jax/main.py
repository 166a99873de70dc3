"""Distil a dataset: `python -m lgm_jax.main --config=FILE --workdir=DIR [--config.KEY=VALUE]`.

Example (the bundled demo, about 4 minutes on a CPU):

    python -m lgm_jax.main --config=configs/demo.py --workdir=workdirs/demo

Parses flags and calls `distill.run`; nothing else. Every config key (lgm_jax/config_base.py) can be
set with --config.KEY=VALUE. A mistake the user can fix (an unknown config key or backbone, a
workdir holding another run, missing data or weights) ends with one line saying what is wrong and
exit status 2; a run stopped by a persistently non-finite loss exits with 3.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from lgm_jax import config_base, distill, errors, stops

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file, e.g. configs/demo.py", lock_config=True
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


def _missing_config_file(argv) -> str | None:
    """What is wrong with --config=FILE[:ARG] when FILE does not exist (else None)."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            path = value.split(":", 1)[0]
            if not os.path.isfile(path):
                return f"--config {path} not found: give a config file such as configs/demo.py"
    return None


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    try:
        distill.run(_CONFIG.value, _WORKDIR.value)
    except (errors.InputError, FileNotFoundError, ValueError) as e:
        sys.exit(errors.report(e))
    except stops.NonFiniteLoss as e:
        logging.error("error: %s", e)
        sys.exit(3)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else [sys.argv[0], *argv])
    if any(a in ("-h", "--help") for a in argv[1:]):  # absl's own --help exits with status 1
        app.usage(shorthelp=True, writeto_stdout=True)
        return 0
    missing = _missing_config_file(argv[1:])
    if missing:
        return errors.report(errors.InputError(missing))
    bad = unknown_overrides(argv[1:])
    if bad:
        return errors.report(
            errors.InputError(
                f"unknown config key(s): {', '.join(bad)}. "
                "The keys and their meaning are in lgm_jax/config_base.py."
            )
        )
    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
