"""The command-line convention: a user's input error, the one way every command reports it, and
the one way every command builds its parser. A leaf module.

An `InputError` is a mistake the user can fix (a wrong path, a file of the wrong kind, a setting
out of range, a checkpoint or cache of another run); its message says what is wrong and how to
fix it. Commands run through `run_command`, which turns one into a single line on stderr and exit
status 2. Every other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Input that lgm_jax cannot use; the message says what is wrong and the fix. A subclass
    with `leave_at_once = True` ends the command right after its line (os._exit), for failures
    whose background threads would otherwise print at exit."""

    leave_at_once = False


def report(e: BaseException) -> int:
    """Print `error: <message>` on one line to stderr; the exit status for an input error (2).
    An error with `leave_at_once` ends the process here, with that status."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    if getattr(e, "leave_at_once", False):
        # What failed (e.g. storage) still has threads that would print their own failures
        # while the interpreter shuts down: the one line above says it all.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    return 2


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body; its exit status is what it returns when that is an int, else 0. An
    InputError (or FileNotFoundError) becomes one line on stderr and exit status 2."""
    try:
        status = main()
    except (InputError, FileNotFoundError) as e:
        return report(e)
    return status if isinstance(status, int) else 0


def read_json(path: str, what: str = "a JSON file", fix: str = ""):
    """The JSON value in `path`; an InputError naming the file, what it should be and what is
    wrong when it is missing, a directory, unreadable or not JSON (`fix`: how to mend it)."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not {what}{'; ' + fix if fix else ''}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path} is not {what} ({type(e).__name__}: {e}){'; ' + fix if fix else ''}"
        ) from e


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, a missing or malformed value) reported like
    every other input error: one line, exit status 2."""

    def error(self, message: str):
        sys.exit(report(InputError(f"{self.prog}: {message} (see --help)")))


def command_parser(command: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m lgm_jax.<command>`: its --help shows that name and `doc` (the
    command's module docstring, which says what it does and gives an example) as written; a
    bad flag or value is one line on stderr and exit status 2."""
    return _Parser(
        prog=f"python -m lgm_jax.{command}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# Flag types with a range: `type=errors.count` etc. A value out of range is refused by the
# parser, naming the flag, the value and what is allowed.


def _number(kind, text: str, ok, allowed: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
    return value


def count(text: str) -> int:
    """An integer >= 1 (images, seeds, epochs, steps, views, batch sizes)."""
    return _number(int, text, lambda v: v >= 1, "an integer >= 1")


def natural(text: str) -> int:
    """An integer >= 0 (warm-up steps, a chunk size where 0 means none)."""
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures)."""
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def finite(text: str) -> float:
    """Any finite number (a mean)."""
    return _number(float, text, math.isfinite, "a finite number")


def non_negative(text: str) -> float:
    """A finite number >= 0 (a standard deviation)."""
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def fraction(text: str) -> float:
    """A number in (0, 1] (a share of a device's peak)."""
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def probability(text: str) -> float:
    """A number in [0, 1]."""
    return _number(float, text, lambda v: 0 <= v <= 1, "a number in [0, 1]")
