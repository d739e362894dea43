"""What detectors share: judging a value, raising a persistent fault once, the facts a decision returns, and
saving all of it to resume a run."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard

from ..events import Event, Record, Severity
from .trend import LossTrend


def finite(v: float | None) -> TypeGuard[float]:
    """A value that can be judged: present and finite."""
    return v is not None and math.isfinite(v)


def fmt(v: float) -> str:
    """A number as people read it."""
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    return f"{v:.2e}" if a < 1e-3 or a >= 1e4 else f"{v:.3g}"


def times(v: float, digits: int = 1) -> str:
    """A ratio as people read it: '7.3', '42'; a huge one in scientific notation, not 34 digits."""
    return f"{v:.{digits}f}" if math.isfinite(v) and abs(v) < 1e4 else fmt(v)


def pct(v: float) -> str:
    """A fraction as a percentage."""
    return f"{100 * v:.0f}%"


class Latch:
    """Raise a persistent fault once per key; again only when it clearly worsens or after it had cleared, and
    never more than `max_raises` times in a run.

    worsen: how much larger `badness` must be than when the fault was last raised to raise it again.
    clear_after, clear_steps: a fault counts as cleared only after its condition has been absent for
    `clear_after` checks spanning at least `clear_steps` steps: records every step must not turn a fault
    that flickers (saturated gates make a gradient tiny now, zero the next step) into one warning a step.
    max_raises: the most times one key is raised in a run, first time included: a fault that comes and
    goes is raised a few times, not once per period.
    """

    def __init__(self, worsen: float = 10.0, clear_after: int = 2, clear_steps: int = 100, max_raises: int = 3):
        self.worsen, self.clear_after, self.clear_steps, self.max_raises = worsen, clear_after, clear_steps, max_raises
        self.fired: dict[str, float] = {}  # key -> badness when last raised, while the fault has not cleared
        self.quiet: dict[str, int] = {}  # key -> consecutive checks without the fault
        self.seen: dict[str, int] = {}  # key -> the last step its condition held
        self.raised: dict[str, int] = {}  # key -> times raised this run

    def check(self, key: str, active: bool, badness: float = 1.0, present: bool | None = None,
              step: int | None = None) -> bool:
        """Whether to raise now; `badness` grows as the fault worsens.

        active: the fault is established (its patience is met); present: its raw condition holds this
        record (defaults to active); step: the record's step (without it, only checks count towards clearing).
        """
        present = active if present is None else present
        if present and step is not None:
            self.seen[key] = step
        if not active:
            if key in self.fired:
                self.quiet[key] = 0 if present else self.quiet.get(key, 0) + 1
                last = self.seen.get(key)
                spanned = step is None or last is None or step - last >= self.clear_steps
                if self.quiet[key] >= self.clear_after and spanned:
                    del self.fired[key], self.quiet[key]
            return False
        self.quiet[key] = 0
        last_bad = self.fired.get(key)
        if self.raised.get(key, 0) >= self.max_raises or (last_bad is not None and badness < last_bad * self.worsen):
            return False
        self.fired[key] = badness
        self.raised[key] = self.raised.get(key, 0) + 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: what was raised, how often, and since when each fault has been quiet."""
        return {"fired": dict(self.fired), "quiet": dict(self.quiet), "seen": dict(self.seen),
                "raised": dict(self.raised)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values (a state saved before `seen` and `raised` existed loads too)."""
        self.fired, self.quiet = dict(d["fired"]), dict(d["quiet"])
        self.seen, self.raised = dict(d.get("seen", {})), dict(d.get("raised", {}))


class Streak:
    """Consecutive records for which a condition held, per key."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.since: dict[str, int] = {}

    def update(self, key: str, active: bool, step: int) -> int:
        """Record the condition at a step; returns how many consecutive records it has held."""
        if active:
            self.count[key] = self.count.get(key, 0) + 1
            self.since.setdefault(key, step)
        else:
            self.count[key] = 0
            self.since.pop(key, None)
        return self.count[key]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: each key's count and the step its streak began."""
        return {"count": dict(self.count), "since": dict(self.since)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values."""
        self.count, self.since = dict(d["count"]), dict(d["since"])


@dataclass(frozen=True)
class Fact:
    """What a detector decided to raise, before any words: the module, where in it, which form of the fault
    (`variant`, e.g. 'layers' or 'time' for vanishing gradient) and the values measured, by name."""

    module: str
    where: str = ""
    variant: str = ""
    values: dict[str, float] = field(default_factory=dict, hash=False)
    severity: Severity | None = None  # None: the detector's own


def _plain(v: Any) -> Any:
    """A detector attribute as JSON-able values (deques and tuples as lists, savable parts as their state)."""
    if hasattr(v, "state_dict"):
        return v.state_dict()
    if isinstance(v, (deque, tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _restored(current: Any, saved: Any) -> Any:
    """`saved` in the shape of the attribute it replaces (a deque keeps its maxlen)."""
    if hasattr(current, "load_state_dict"):
        current.load_state_dict(saved)
        return current
    if isinstance(current, deque):
        return deque(saved, maxlen=current.maxlen)
    return saved


class Detector:
    """Base of the default detectors: `update(record) -> list[Event]`.

    A subclass decides in `_decide(record, trend) -> list[Fact]` (its state and the record, nothing else)
    and words each fact in `_describe(fact) -> (message, hint)`. Alone, a detector keeps its own loss trend;
    in a `Detectors` suite it reads the suite's, updated once per record (`read`).
    """

    kind: ClassVar[str] = ""
    severity: ClassVar[Severity] = "warning"
    needs_trend: ClassVar[bool] = False  # whether `_decide` reads the loss trend
    _state: ClassVar[tuple[str, ...]] = ()  # attributes a checkpoint keeps besides the latch, streak and trend

    def __init__(self) -> None:
        self.latch = Latch()
        self.streak = Streak()
        self.trend = LossTrend()  # its own, used when it runs alone

    def update(self, record: Record) -> list[Event]:
        """Read one record; return the events it raises."""
        if self.needs_trend:
            self.trend.update(record)
        return self.read(record, self.trend)

    def read(self, record: Record, trend: LossTrend) -> list[Event]:
        """Read one record against a loss trend already updated with it; return the events it raises."""
        return [self.event(record, f) for f in self._decide(record, trend)]

    def event(self, record: Record, fact: Fact) -> Event:
        """The event of a fact: this detector's kind at the record's step, in words."""
        message, hint = self._describe(fact)
        return Event(record.step, self.kind, fact.severity or self.severity, fact.module, message, hint,
                     fact.where, dict(fact.values))

    def persists(self, key: str, present: bool, step: int, patience: int, badness: float = 1.0) -> int:
        """Feed a fault's raw condition; returns how long it has held when it is to be raised now, else 0."""
        n = self.streak.update(key, present, step)
        return n if self.latch.check(key, n >= patience, badness, present, step) else 0

    def _state_names(self) -> tuple[str, ...]:
        return ("latch", "streak", *(("trend",) if self.needs_trend else ()), *self._state)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: the streaks, latches, trend and history a resumed run needs."""
        return {n: _plain(getattr(self, n)) for n in self._state_names()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values."""
        for n in self._state_names():
            setattr(self, n, _restored(getattr(self, n), d[n]))

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        """What to raise on a record; by default each watched module on its own (`_decide_module`)."""
        return [f for m in record.modules if (f := self._decide_module(record, trend, m)) is not None]

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:  # pragma: no cover
        raise NotImplementedError

    def _describe(self, fact: Fact) -> tuple[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError
