"""The command-line convention: a user's input error, the one way every command reports it, and
the one way every command builds its parser. A leaf module.

An `InputError` is a mistake the user can fix (a wrong path, a file of the wrong kind, a setting
out of range, a checkpoint or cache of another run); its message says what is wrong and how to
fix it. Commands run through `run_command`, which turns one into a single line on stderr and exit
status 2. Every other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Input that lgm_jax cannot use; the message says what is wrong and the fix."""


def report(e: BaseException) -> int:
    """Print `error: <message>` on one line to stderr; the exit status for an input error (2)."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body; its exit status is what it returns when that is an int, else 0. An
    InputError (or FileNotFoundError) becomes one line on stderr and exit status 2."""
    try:
        status = main()
    except (InputError, FileNotFoundError) as e:
        return report(e)
    return status if isinstance(status, int) else 0


def command_parser(command: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m lgm_jax.<command>`: its --help shows that name and `doc` (the
    command's module docstring, which says what it does and gives an example) as written."""
    return argparse.ArgumentParser(
        prog=f"python -m lgm_jax.{command}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
