"""Events, and the typed warnings that carry events to people."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from .record import Record  # noqa: F401 - lstmwatch.events.Record, as before

Severity = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Event:
    """A finding: what was measured and what to do about it."""

    step: int
    kind: str
    severity: Severity
    module: str  # qualified name of the LSTM, or "" for the whole model
    message: str  # what was measured, against which threshold, and what it means
    hint: str  # the concrete remedy
    # Where it happened inside the module: a non-finite site ('data', 'gates', 'loss', 'grad/<param>'),
    # a layer ('l0') or a gate of one ('l0/forget'); '' for the module or the run as a whole.
    where: str = ""
    # What was measured, by name ('ratio', 'threshold', ...): for programs; `message` is for people.
    values: dict[str, float] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        where = f" · {self.module}" if self.module else ""
        return f"lstmwatch step {self.step}{where} · {self.kind}\n  {self.message}\n  fix: {self.hint}"


class LSTMWatchWarning(UserWarning):
    """Base class of every warning lstmwatch raises; filter it to silence lstmwatch."""

    kind = ""

    def __init__(self, event: Event | str):
        self.event = event if isinstance(event, Event) else None
        super().__init__(str(event))


class ExplodingGradientWarning(LSTMWatchWarning):
    """Gradient norms far above the run's own level."""

    kind = "exploding_gradient"


class VanishingGradientWarning(LSTMWatchWarning):
    """Early layers or timesteps get vanishing gradient."""

    kind = "vanishing_gradient"


class NoGradientWarning(LSTMWatchWarning):
    """An LSTM gets no gradient, or an exactly zero one."""

    kind = "no_gradient"


class NotUpdatedWarning(LSTMWatchWarning):
    """An LSTM gets gradients but its weights do not change."""

    kind = "not_updated"


class StalledLossWarning(LSTMWatchWarning):
    """The loss has not improved since the start of the run."""

    kind = "stalled_loss"


class DivergingLossWarning(LSTMWatchWarning):
    """The loss rises well above its best."""

    kind = "diverging_loss"


class NonFiniteWarning(LSTMWatchWarning):
    """A NaN or Inf appeared."""

    kind = "nonfinite"


class GateSaturationWarning(LSTMWatchWarning):
    """Sigmoid gates pinned near 0 or 1."""

    kind = "gate_saturation"


class HiddenSaturationWarning(LSTMWatchWarning):
    """Cell output or hidden state pinned at +-1."""

    kind = "hidden_saturation"


class UnnormalizedInputWarning(LSTMWatchWarning):
    """Inputs far from zero mean and unit scale."""

    kind = "unnormalized_input"


class PaddingWarning(LSTMWatchWarning):
    """Zero padding fed as a plain tensor rather than a PackedSequence."""

    kind = "padding"


class OverfittingWarning(LSTMWatchWarning):
    """Validation loss rises while training loss falls."""

    kind = "overfitting"


WARNINGS: dict[str, type[LSTMWatchWarning]] = {
    c.kind: c
    for c in (
        ExplodingGradientWarning, VanishingGradientWarning, NoGradientWarning, NotUpdatedWarning,
        StalledLossWarning, DivergingLossWarning, NonFiniteWarning, GateSaturationWarning,
        HiddenSaturationWarning, UnnormalizedInputWarning, PaddingWarning, OverfittingWarning,
    )
}


for _cls in (LSTMWatchWarning, *WARNINGS.values()):
    _cls.__module__ = "lstmwatch"  # users name them lstmwatch.PaddingWarning (filters, -W error::...)


def warning_for(event: Event) -> LSTMWatchWarning:
    """The typed warning instance that carries an event."""
    return WARNINGS.get(event.kind, LSTMWatchWarning)(event)


class LSTMWatchFailure(LSTMWatchWarning):
    """lstmwatch itself could not do something (a sink or detector failed); training goes on."""

    kind = "failure"


class EventLog:
    """A run's events, bounded: the first event of each kind and module is always kept (the diagnosis ranks
    root causes by them), then the latest `maxlen`. Iterates in the order the events were raised."""

    def __init__(self, maxlen: int = 1_000):
        self.maxlen = maxlen
        self._first: dict[tuple[str, str], tuple[int, Event]] = {}  # (kind, module) -> (arrival, event)
        self._tail: deque[tuple[int, Event]] = deque(maxlen=maxlen)
        self._n = 0  # events ever added: their arrival numbers

    def append(self, event: Event) -> None:
        """Keep an event."""
        self._first.setdefault((event.kind, event.module), (self._n, event))
        self._tail.append((self._n, event))
        self._n += 1

    def extend(self, events: Iterable[Event]) -> None:
        """Keep events, in order."""
        for e in events:
            self.append(e)

    def clear(self) -> None:
        """Forget every event."""
        self._first.clear()
        self._tail.clear()
        self._n = 0

    @property
    def total(self) -> int:
        """How many events were ever added, kept or not."""
        return self._n

    def _kept(self) -> list[Event]:
        seen = dict(self._tail)
        seen.update(self._first.values())
        return [seen[k] for k in sorted(seen)]

    def __iter__(self) -> Iterator[Event]:
        return iter(self._kept())

    def __len__(self) -> int:
        tail = {n for n, _ in self._tail}
        return len(tail) + sum(n not in tail for n, _ in self._first.values())

    def __bool__(self) -> bool:
        return self._n > 0

    def __getitem__(self, i: int) -> Event:
        return self._kept()[i]

    def __repr__(self) -> str:
        return f"EventLog({len(self)} kept of {self._n})"
