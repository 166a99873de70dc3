"""What stops a distillation run early: a meta-loss non-finite too many steps in a row, SIGTERM
and Ctrl-C. The loop asks these between steps; each stop keeps the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal

import jax

log = logging.getLogger("lgm_jax")


class NonFiniteLoss(RuntimeError):
    """The meta-loss stayed non-finite for too many steps in a row."""


class NonFiniteGuard:
    """Counts the steps whose update was skipped for a non-finite meta-loss, and stops the run
    when `limit` come in a row. The step's flags stay on the device until `check` (at log
    points and before checkpoints), so the loop never waits on a step just to look at it."""

    def __init__(self, limit: int, checkpoints):
        self.limit, self.checkpoints = limit, checkpoints
        self.pending, self.total, self.in_a_row = [], 0, 0

    def push(self, step: int, finite) -> None:
        self.pending.append((step, finite))

    def check(self) -> None:
        flags = jax.device_get([f for _, f in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for step, ok in zip(steps, flags):
            if ok:
                self.in_a_row = 0
                continue
            self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
            log.warning("step %d: non-finite meta-loss, update skipped", step)
            if self.limit and self.in_a_row >= self.limit:
                raise NonFiniteLoss(
                    f"the meta-loss was non-finite for {self.in_a_row} steps in a row (up to "
                    f"step {step}); the last good checkpoint in {self.checkpoints} is kept. "
                    "Lower the learning rate or use float32 compute."
                )


class Stop:
    """SIGTERM and Ctrl-C (SIGINT) ask the loop to stop after the step it is in, with a
    checkpoint; a second Ctrl-C ends the process at once (exit 130, nothing written)."""

    STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self):
        self.signal = None
        self.old = {s: signal.signal(s, self._on) for s in self.STATUS}

    def _on(self, signum, _frame):
        if signum == signal.SIGINT and self.signal is not None:
            os._exit(130)  # the user insists: no checkpoint, no clean-up
        self.signal = signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: stopping after this step with a checkpoint (again: at once)")

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signal == signal.SIGINT else "SIGTERM"

    @property
    def status(self) -> int:
        return self.STATUS[self.signal]

    def restore(self) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
