"""The training loss seen through the records, computed once per record and read by every detector that asks."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from .. import keys
from ..record import Record

# Steps over which the starting level is averaged: 50 for "has the loss improved from its start", 2 for
# divergence, so a run that diverges at once does not pull its own yardstick up.
START_STEPS = (2, 50)
DIVERGED = 3.0  # a loss this many times its starting level or its best is diverging, never stalled


class LossTrend:
    """The training loss seen through the records: its starting levels, best and latest smoothed values.

    Everything is kept in the loss's own units; a detector that reads a score that should rise (mode "max")
    passes sign=-1 where it asks for a best, an improvement or a stall.

    A starting level is the mean loss over the first `steps` steps (each record's mean loss weighted by the
    steps it covers), so a few lucky first batches do not set it. The latest value is the mean over the last
    `smooth_steps` steps or more (whole records), so records every step on small noisy batches read like
    records every 50; the best is the lowest (sign -1: highest) such value. A non-finite loss breaks the
    trend: from then on it has no improvement and no stall (what follows is the non-finite detector's), while
    its levels go on over the finite losses that come after (a divergence is still judged on them).

    The trend also knows how noisy the per-step loss is, which a smoothed value over a few steps is not (a
    lucky first step on a batch of one can sit far below the run's level): `spread()`. Each record gives
    samples of it from the differences it holds: its last step against the mean of its other steps, and that
    mean against the previous record's last step (a record of one step: its step against the step before).
    Between steps whose losses are independent such a difference is as likely to fall as to rise, so the falls
    alone measure the spread (the rises alone, for a score): a loss that rises by itself, as a diverging one
    does, does not widen it.
    """

    def __init__(self, smooth_steps: int = 50, start_steps: tuple[int, ...] = START_STEPS):
        self.smooth_steps = smooth_steps
        self._start: dict[int, list[float]] = {n: [0.0, 0.0] for n in start_steps}  # steps -> [sum, covered]
        self._recent: deque[tuple[int, float]] = deque()  # (steps covered, mean loss) of the latest records
        self.latest: float | None = None
        self.low: float | None = None  # the lowest and highest smoothed loss so far
        self.high: float | None = None
        self.prior_low: float | None = None  # low and high before the latest record came in
        self.prior_high: float | None = None
        self.step = 0  # step of the latest record with a finite loss
        self._prev_step = 0
        self.broken = False
        self.latest_unbroken: float | None = None  # the latest value before the first non-finite loss
        self.latest_steps = 0  # steps the latest value covers
        self.low_steps = self.high_steps = 0  # steps the lowest and highest values covered
        self.prior_low_steps = self.prior_high_steps = 0
        # Squared differences between steps, each an estimate of the per-step variance: [sum over the falls, sum
        # over the rises, how many differences]; `_prior_spread` before the latest record. `_last`: the latest
        # record's last loss, at step `_last_step`.
        self._spread: list[float] = [0.0, 0.0, 0.0]
        self._prior_spread: list[float] = [0.0, 0.0, 0.0]
        self._last: float | None = None
        self._last_step = 0

    def update(self, record: Record) -> None:
        """Take the record's mean loss since the previous record; a record without one changes nothing."""
        v = record.get(keys.LOSS_MEAN)
        if v is None:
            return
        if not math.isfinite(v):
            self.broken = True
            return
        span = max(record.step - self._prev_step, 1)
        self._prev_step = record.step
        self._prior_spread = list(self._spread)
        self._add_spread(record, v, span)
        if not self.broken:
            self.step = record.step
        for steps, acc in self._start.items():
            if acc[1] < steps:
                acc[0] += v * span
                acc[1] += span
        self._recent.append((span, v))
        covered = sum(n for n, _ in self._recent)  # whole steps: exact, whatever the length of the run
        while len(self._recent) > 1 and covered - self._recent[0][0] >= self.smooth_steps:
            covered -= self._recent.popleft()[0]  # the newer records cover the window without it
        self.latest = sum(n * x for n, x in self._recent) / covered
        self.latest_steps = covered
        self.prior_low, self.prior_high = self.low, self.high
        self.prior_low_steps, self.prior_high_steps = self.low_steps, self.high_steps
        if self.low is None or self.latest < self.low:
            self.low, self.low_steps = self.latest, covered
        if self.high is None or self.latest > self.high:
            self.high, self.high_steps = self.latest, covered
        if not self.broken:
            self.latest_unbroken = self.latest

    def _add_spread(self, record: Record, mean: float, span: int) -> None:
        """Samples of the per-step variance from the record's losses (see the class)."""
        last = record.get(keys.LOSS)
        before = self._last if self._last_step == record.step - span else None  # the last loss of the step before
        if last is None or not math.isfinite(last):
            self._last, self._last_step = None, 0
            return
        self._last, self._last_step = last, record.step
        # (a, b, c): two losses whose difference b - a has variance c * spread^2 when the steps are independent.
        pairs: list[tuple[float, float, float]] = []
        if span == 1:
            if before is not None:
                pairs.append((before, last, 2.0))
        else:
            others = (span * mean - last) / (span - 1)  # the mean of the record's steps before its last one
            pairs.append((others, last, span / (span - 1)))
            if before is not None:
                pairs.append((before, others, span / (span - 1)))
        for a, b, c in pairs:
            diff = b - a
            var = diff * diff / c
            if not math.isfinite(var):
                continue
            self._spread[0 if diff < 0 else 1] += var  # every difference is a sample, a fall or a rise
            self._spread[2] += 1

    def spread(self, sign: float = 1.0, prior: bool = False) -> float:
        """The standard deviation of the per-step loss, from the step-to-step falls (sign -1: the rises) seen so
        far; `prior`: before the latest record. 0 while none is known."""
        fall, rise, n = self._prior_spread if prior else self._spread
        return math.sqrt(2 * (fall if sign > 0 else rise) / n) if n else 0.0

    def best_steps(self, sign: float = 1.0, prior: bool = False) -> int:
        """The steps the best smoothed value covered (sign -1: of a score); `prior`: before the latest record."""
        if prior:
            return self.prior_low_steps if sign > 0 else self.prior_high_steps
        return self.low_steps if sign > 0 else self.high_steps

    def noise(self, sign: float = 1.0, prior: bool = False) -> float:
        """The standard error of the latest value's difference from the best before it, by the per-step spread
        (`prior`: as known before the latest record); 0 while no spread is known."""
        n_best = self.best_steps(sign, prior=True)
        if not n_best or not self.latest_steps:
            return 0.0
        return self.spread(sign, prior) * math.sqrt(1 / n_best + 1 / self.latest_steps)

    def level0(self, steps: int = 50) -> float | None:
        """The starting level: the mean loss over the first `steps` steps (one of START_STEPS)."""
        total, covered = self._start[steps]
        return total / covered if covered else None

    def best(self, sign: float = 1.0, prior: bool = False) -> float | None:
        """The best smoothed loss so far (sign -1: of a score, the highest); `prior`: before the latest record."""
        if prior:
            return self.prior_low if sign > 0 else self.prior_high
        return self.low if sign > 0 else self.high

    def improvement(self, sign: float = 1.0) -> float | None:
        """Relative improvement of the latest loss over the starting level (0.1 = 10% better); None once broken."""
        level0 = self.level0()
        if level0 is None or self.latest is None or self.broken:
            return None
        return (sign * level0 - sign * self.latest) / max(abs(level0), 1e-12)

    def stalled(self, min_steps: int, min_delta: float, sign: float = 1.0, step: int | None = None) -> bool:
        """No improvement of at least min_delta (relative) from the start, at `step` (default: the latest loss's)
        when that is min_steps or later. The one definition of a stalled loss every detector uses."""
        imp = self.improvement(sign)
        return imp is not None and (self.step if step is None else step) >= min_steps and imp < min_delta

    def diverged(self, sign: float = 1.0) -> bool:
        """The latest loss is DIVERGED times its starting level, or (a loss, not a score) its best: divergence,
        which no detector may read as a stall."""
        imp = self.improvement(sign)
        if imp is not None and imp <= -(DIVERGED - 1):
            return True
        best = self.best(sign)
        return sign > 0 and best is not None and best > 0 and self.latest is not None and self.latest > DIVERGED * best

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: enough to resume the trend from a checkpoint."""
        return {"smooth_steps": self.smooth_steps, "start": [[n, *a] for n, a in self._start.items()],
                "recent": [list(r) for r in self._recent], "latest": self.latest, "low": self.low, "high": self.high,
                "prior_low": self.prior_low, "prior_high": self.prior_high, "step": self.step,
                "prev_step": self._prev_step, "broken": self.broken, "latest_unbroken": self.latest_unbroken,
                "latest_steps": self.latest_steps, "low_steps": self.low_steps, "high_steps": self.high_steps,
                "prior_low_steps": self.prior_low_steps, "prior_high_steps": self.prior_high_steps,
                "spread": list(self._spread), "prior_spread": list(self._prior_spread), "last": self._last,
                "last_step": self._last_step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values."""
        self.smooth_steps = d["smooth_steps"]
        self._start = {int(n): [float(s), float(c)] for n, s, c in d["start"]}
        self._recent = deque((int(n), float(x)) for n, x in d["recent"])
        self.latest, self.low, self.high = d["latest"], d["low"], d["high"]
        self.prior_low, self.prior_high = d["prior_low"], d["prior_high"]
        self.step, self._prev_step, self.broken = d["step"], d["prev_step"], d["broken"]
        self.latest_unbroken = d["latest_unbroken"]
        # A state saved before the trend knew the spread: none known yet, it is learned from the records to come.
        self.latest_steps, self.low_steps, self.high_steps, self.prior_low_steps, self.prior_high_steps = (
            int(d.get(k, 0)) for k in ("latest_steps", "low_steps", "high_steps", "prior_low_steps",
                                       "prior_high_steps"))
        self._spread = [float(x) for x in d.get("spread", (0.0, 0.0, 0))]
        self._prior_spread = [float(x) for x in d.get("prior_spread", (0.0, 0.0, 0))]
        self._last, self._last_step = d.get("last"), int(d.get("last_step", 0))
