"""What detectors share: reading a record, the loss trend, and raising a persistent fault once."""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable

from ..events import Event, Record, Severity

_LAYER = re.compile(r"^l(\d+)(_reverse)?$")


def finite(v: float | None) -> bool:
    """A value that can be judged: present and finite."""
    return v is not None and math.isfinite(v)


def layers(record: Record, module: str) -> list[str]:
    """Layer-direction labels of a module present in a record ('l0', 'l0_reverse', ...), in order."""
    p = module + "/"
    found = {k[len(p):].split("/", 1)[0] for k in record.stats if k.startswith(p) and k.endswith("/grad_norm")}
    labs = [lab for lab in found if _LAYER.match(lab)]
    return sorted(labs, key=lambda lab: (int(_LAYER.match(lab).group(1)), lab))


def layer_norms(record: Record, module: str) -> dict[int, float]:
    """Gradient norm of each layer, both directions together."""
    out: dict[int, float] = {}
    for lab in layers(record, module):
        v = record.stats.get(f"{module}/{lab}/grad_norm")
        if v is not None:
            k = int(_LAYER.match(lab).group(1))
            out[k] = math.sqrt(out.get(k, 0.0) ** 2 + v * v)
    return out


def max_update_ratio(record: Record, module: str | None = None) -> float | None:
    """The largest update-to-weight ratio of a module (or of all), if this record measured it."""
    vals = [v for k, v in record.stats.items() if k.endswith("/update_ratio") and finite(v)
            and (module is None or k.startswith(module + "/"))]
    return max(vals) if vals else None


def fmt(v: float) -> str:
    """A number as people read it."""
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    return f"{v:.2e}" if a < 1e-3 or a >= 1e4 else f"{v:.3g}"


def pct(v: float) -> str:
    """A fraction as a percentage."""
    return f"{100 * v:.0f}%"


class LossTrend:
    """The training loss seen through the records: its starting level, best and latest smoothed values.

    The starting level is the mean loss over the first `start_steps` steps (each record's mean loss
    weighted by the steps it covers), so a few lucky first batches do not set it. The latest value is the
    mean over the last `smooth_steps` steps or more (whole records), so records every step on small noisy
    batches read like records every 50; the best is the lowest such value. After a non-finite loss the
    trend stops: what follows is the non-finite detector's.
    """

    def __init__(self, start_steps: int = 50, sign: float = 1.0, smooth_steps: int = 50):
        self.start_steps, self.sign, self.smooth_steps = start_steps, sign, smooth_steps
        self._sum = self._covered = 0.0
        self._recent: deque[tuple[int, float]] = deque()  # (steps covered, mean loss) of the latest records
        self.level0: float | None = None
        self.best: float | None = None
        self.latest: float | None = None
        self.step = self._prev_step = 0
        self.broken = False

    def update(self, record: Record) -> None:
        """Take the record's mean loss since the previous record."""
        v = record.stats.get("loss_mean")
        if v is None or self.broken:
            return
        if not math.isfinite(v):
            self.broken = True
            return
        v *= self.sign
        span = max(record.step - self._prev_step, 1)
        self._prev_step = self.step = record.step
        if self._covered < self.start_steps:
            self._sum += v * span
            self._covered += span
            self.level0 = self._sum / self._covered
        self._recent.append((span, v))
        while len(self._recent) > 1 and sum(n for n, _ in self._recent) - self._recent[0][0] >= self.smooth_steps:
            self._recent.popleft()  # the newer records cover the window without it
        self.latest = sum(n * x for n, x in self._recent) / sum(n for n, _ in self._recent)
        self.best = self.latest if self.best is None else min(self.best, self.latest)

    def improvement(self) -> float | None:
        """Relative improvement of the latest loss over the starting level (0.1 = 10% lower)."""
        if self.level0 is None or self.latest is None or self.broken:
            return None
        return (self.level0 - self.latest) / max(abs(self.level0), 1e-12)

    def stalled(self, min_steps: int, min_delta: float) -> bool:
        """No improvement of at least min_delta (relative) after min_steps steps."""
        imp = self.improvement()
        return imp is not None and self.step >= min_steps and imp < min_delta


class Latch:
    """Raise a persistent fault once per key; again only when it clearly worsens or after it had cleared."""

    def __init__(self, worsen: float = 10.0, clear_after: int = 2):
        self.worsen, self.clear_after = worsen, clear_after
        self.fired: dict[str, float] = {}  # key -> badness when last raised
        self.quiet: dict[str, int] = {}  # key -> consecutive checks without the fault

    def check(self, key: str, active: bool, badness: float = 1.0, present: bool | None = None) -> bool:
        """Whether to raise now; `badness` grows as the fault worsens.

        active: the fault is established (its patience is met); present: its raw condition holds this
        record (defaults to active). A fault counts as cleared only after `clear_after` records without
        its condition, so a streak that rebuilds after one healthy record does not raise it again.
        """
        present = active if present is None else present
        if not active:
            if key in self.fired:
                self.quiet[key] = 0 if present else self.quiet.get(key, 0) + 1
                if self.quiet[key] >= self.clear_after:
                    del self.fired[key]
            return False
        self.quiet[key] = 0
        last = self.fired.get(key)
        if last is None or badness >= last * self.worsen:
            self.fired[key] = badness
            return True
        return False


class Detector:
    """Base of the default detectors: `update(record) -> list[Event]`; subclasses implement `_check`."""

    kind = ""
    severity: Severity = "warning"

    def __init__(self) -> None:
        self.latch = Latch()
        self.streak = Streak()

    def persists(self, key: str, present: bool, step: int, patience: int, badness: float = 1.0) -> int:
        """Feed a fault's raw condition; returns how long it has held when it is to be raised now, else 0."""
        n = self.streak.update(key, present, step)
        return n if self.latch.check(key, n >= patience, badness, present) else 0

    def update(self, record: Record) -> list[Event]:
        """Read one record; return the events it raises."""
        return list(self._check(record))

    def event(self, record: Record, module: str, message: str, hint: str, severity: Severity | None = None) -> Event:
        """An event of this detector's kind at the record's step."""
        return Event(record.step, self.kind, severity or self.severity, module, message, hint)

    def _check(self, record: Record) -> Iterable[Event]:  # pragma: no cover - abstract
        raise NotImplementedError


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
