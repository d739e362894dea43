"""The logging schedule: whether step N is a logging step is answered here, and only here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tripwire import Tripwire

Schedule = Callable[[int], bool]


def schedule(log_every: int | Schedule) -> Schedule:
    """A `step -> bool` logging schedule: dense at the start (1, 2, 4, 8, ...), then every `log_every`."""
    if callable(log_every):
        return log_every
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an int >= 1 or a step -> bool callable, got {log_every!r}")

    def every(step: int) -> bool:
        # Powers of two below log_every catch a fault present from initialization at once.
        return step % log_every == 0 or (step < log_every and step & (step - 1) == 0)

    return every


@dataclass(eq=False)  # identity: a clock is one run's, kept in weak sets (amp.py)
class Clock:
    """Where the run is: the step in progress and whether it is a logging step. Hooks read it; the Watcher
    moves it with `advance()`."""

    step: int = 1  # the step in progress (1-based)
    logging: bool = True  # whether the step in progress is a logging step
    ran: bool = False  # whether a training forward or backward of the step in progress ran (the probes' hooks)
    sample: int = 8
    generator: torch.Generator | None = None
    scaler: object | None = None  # the torch.amp.GradScaler passed to watch(): its scale divides every gradient
    found: object | None = None  # else the one last found scaling a backward that reached the hooks (amp.py)
    rule: Schedule | None = None  # the schedule; None: every step is a logging step
    trip: Tripwire | None = None  # the tapes' NaN/Inf tripwire, which can bring a record forward

    @classmethod
    def start(cls, log_every: int | Schedule, sample: int = 8, generator: torch.Generator | None = None,
              scaler: object | None = None) -> Clock:
        """A clock at step 1 of a run logged on `log_every`'s schedule."""
        rule = schedule(log_every)
        return cls(step=1, logging=bool(rule(1)), sample=sample, generator=generator, scaler=scaler, rule=rule)

    def is_logging(self, step: int) -> bool:
        """Whether `step` is a logging step."""
        return True if self.rule is None else bool(self.rule(step))

    def advance(self) -> None:
        """Move to the next step."""
        self.step += 1
        self.logging = self.is_logging(self.step)
        self.ran = False

    def seek(self, step: int) -> None:
        """Continue a resumed run at `step`."""
        self.step = step
        self.logging = self.is_logging(step)
