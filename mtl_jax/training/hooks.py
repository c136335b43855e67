"""What the training loop does besides stepping, and when: hooks every N steps, the best
evaluation so far, and SIGINT / SIGTERM.

Each hook runs after a step whose count divides by ``every`` (or, ``before``, ahead of such a
step); at the last step of an epoch only when ``at_epoch_end`` (the end of an epoch evaluates
and checkpoints anyway). A hook receives a read-only :class:`StepRecord`; a new cadence is one
more :class:`Hook`.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """Where the loop is when a hook runs: the steps taken, the epoch, the last step's metrics (device
    arrays; None before the first step) and the train state."""

    step: int
    epoch: int
    metrics: Any
    state: Any


@dataclass(frozen=True)
class Hook:
    name: str
    every: int  # steps; 0: never
    run: Callable[[StepRecord], None]
    before: bool = False  # ahead of the step (the state it sees has not taken it)
    at_epoch_end: bool = False  # also after the last step of an epoch (else never then)

    def due(self, step: int, end_of_epoch: bool = False) -> bool:
        """Whether the hook runs at ``step`` (steps taken: after a step, its count; before, the count so far)."""
        if end_of_epoch and not self.before:
            return self.at_epoch_end
        return self.every > 0 and step % self.every == 0


@dataclass
class Best:
    """The best evaluation so far by the mean primary score (checkpointed in the loop state), and the
    evaluations since it (``--patience``)."""

    score: float = -1.0
    epoch: int = -1
    step: int = -1  # -1: none yet
    since: int = 0

    def consider(self, score: float, epoch: int, step: int) -> bool:
        """Whether ``score`` is the best so far (then it is kept)."""
        if self.step >= 0 and score <= self.score:
            self.since += 1
            return False
        self.score, self.epoch, self.step, self.since = score, epoch, step, 0
        return True

    def exhausted(self, patience: int) -> bool:
        """``patience`` evaluations (when set) have passed without a better one."""
        return bool(patience) and self.since >= patience

    @classmethod
    def from_dict(cls, d: dict) -> Best:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


class SignalStop:
    """SIGINT / SIGTERM noted (not acted on) while the loop runs, so that it stops at a step boundary
    with a checkpoint; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> SignalStop:
        self._previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, _frame) -> None:
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name
