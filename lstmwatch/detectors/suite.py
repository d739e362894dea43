"""The detectors of a run as one suite: the loss trend updated once per record, then each detector reads it."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from difflib import get_close_matches
from numbers import Real
from typing import Any, overload

from ..events import Event
from ..interfaces import Detector as DetectorProtocol
from ..record import Record
from .base import Detector
from .gradients import ExplodingGradient, NoGradient, NotUpdated, VanishingGradient
from .inputs import Padding, UnnormalizedInput
from .loss import DivergingLoss, Overfitting, StalledLoss
from .nonfinite import NonFinite
from .saturation import GateSaturation, HiddenSaturation
from .trend import LossTrend

DEFAULTS: dict[str, type[Detector]] = {
    c.kind: c
    for c in (NonFinite, UnnormalizedInput, Padding, ExplodingGradient, VanishingGradient, NoGradient, NotUpdated,
              StalledLoss, DivergingLoss, GateSaturation, HiddenSaturation, Overfitting)
}


class Detectors(Sequence[DetectorProtocol]):
    """Detectors that share one loss trend, updated once per record.

    lstmwatch's own detectors read the shared trend; any other object with `kind` and `update(record)` is
    called as it is. `update(record)` runs them all; a caller that isolates failures per detector calls
    `observe(record)` once, then `run(detector, record)` for each. A sequence of its detectors, in order.
    """

    def __init__(self, detectors: Iterable[DetectorProtocol] = ()):
        if isinstance(detectors, (str, bytes)) or not isinstance(detectors, Iterable):
            raise TypeError(f"detectors must be a list of detectors, or a dict tuning the defaults "
                            f"({{'stalled_loss': {{'patience': 500}}, 'padding': False}}), got {detectors!r}")
        self.detectors: list[DetectorProtocol] = [_checked(d) for d in detectors]
        self.trend = LossTrend()

    @classmethod
    def default(cls, **tune: dict[str, Any] | bool) -> Detectors:
        """The default detectors; `kind={...}` passes arguments to one, `kind=False` leaves it out."""
        unknown = set(tune) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown detector kind(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        return cls([_made(kind, c, tune.get(kind, True)) for kind, c in DEFAULTS.items()
                    if tune.get(kind) is not False])

    def observe(self, record: Record) -> None:
        """Update the shared loss trend with a record: once per record, before `run`."""
        self.trend.update(record)

    def run(self, detector: DetectorProtocol, record: Record) -> list[Event]:
        """One detector on a record already observed."""
        if isinstance(detector, Detector):
            return detector.read(record, self.trend)
        return detector.update(record)

    def update(self, record: Record) -> list[Event]:
        """Observe a record, then run every detector on it; the events in detector order."""
        self.observe(record)
        return [e for d in self.detectors for e in self.run(d, record)]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: the trend and each detector's state (those that have one), in order."""
        return {"trend": self.trend.state_dict(),
                "detectors": [{"kind": d.kind, "state": d.state_dict() if hasattr(d, "state_dict") else None}
                              for d in self.detectors]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values; the suite must hold the same kinds in the same order."""
        saved = d["detectors"]
        kinds = [s["kind"] for s in saved]
        if kinds != [det.kind for det in self.detectors]:
            raise ValueError(f"saved detectors {kinds} do not match {[det.kind for det in self.detectors]}")
        self.trend.load_state_dict(d["trend"])
        for det, s in zip(self.detectors, saved):
            if s["state"] is not None and hasattr(det, "load_state_dict"):
                det.load_state_dict(s["state"])

    @overload
    def __getitem__(self, i: int) -> DetectorProtocol: ...

    @overload
    def __getitem__(self, i: slice) -> list[DetectorProtocol]: ...

    def __getitem__(self, i: int | slice) -> DetectorProtocol | list[DetectorProtocol]:
        return self.detectors[i]

    def __len__(self) -> int:
        return len(self.detectors)

    def __iter__(self) -> Iterator[DetectorProtocol]:
        return iter(self.detectors)

    def __repr__(self) -> str:
        return f"Detectors([{', '.join(type(d).__name__ for d in self.detectors)}])"


def _checked(d: Any) -> DetectorProtocol:
    """A detector as given, refused at once if it cannot be one: the failure would otherwise come mid-run."""
    what = f"detectors: {d!r} ({type(d).__name__}) is not a detector"
    if isinstance(d, type):
        raise TypeError(f"{what}: pass an instance, `{d.__name__}()`, not the class")
    if not (isinstance(getattr(d, "kind", None), str) and callable(getattr(d, "update", None))):
        raise TypeError(f"{what}: a detector needs `kind` (a str) and `update(record)` returning a list of events")
    return d


def _made(kind: str, c: type[Detector], opt: Any) -> Detector:
    """One default detector, tuned by `opt` (True: as it comes; a dict: its options), each option checked against
    the class's own arguments, so a misspelt one fails at the call rather than never being used."""
    params = {n: p.default for n, p in inspect.signature(c).parameters.items()}
    listed = ", ".join(params) or "none"
    if opt is True:
        return c()
    if not isinstance(opt, dict):
        options = (f"a dict of {c.__name__}'s options (e.g. {{{kind!r}: {{{next(iter(params))!r}: ...}}}}), "
                   if params else "")
        raise TypeError(f"detectors[{kind!r}] must be {options}False to leave it out or True to keep it, got {opt!r}; "
                        f"its options: {listed}")
    for name, value in opt.items():
        if name not in params:
            near = get_close_matches(str(name), params, n=1)
            raise TypeError(f"detectors[{kind!r}]: {c.__name__} has no option {name!r}"
                            + (f" (did you mean {near[0]!r}?)" if near else "") + f"; its options: {listed}")
        default = params[name]
        number = isinstance(default, Real) and not isinstance(default, bool)
        if number and not (isinstance(value, Real) and not isinstance(value, bool)):
            raise TypeError(f"detectors[{kind!r}][{name!r}] must be a number (default {default!r}), got {value!r}")
    return c(**opt)


def default_detectors(**tune: dict[str, Any] | bool) -> Detectors:
    """The default detectors as a suite sharing one loss trend; `kind={...}` tunes one, `kind=False` omits it."""
    return Detectors.default(**tune)
