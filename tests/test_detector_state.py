"""Resuming: a detector (a suite, a loss trend) saved with state_dict() and loaded into a fresh one after a JSON
round trip goes on exactly as if the run had never stopped: the same events at the same steps."""

from __future__ import annotations

import json
import math
import random

import pytest
from test_detectors import DETECTOR_KINDS, FAULTS, M, log_steps, rec

from lstmwatch.detectors import DEFAULTS, Detectors, LossTrend, NonFinite
from lstmwatch.events import Event, Record

# Faulty, then healthy long enough to clear, then faulty again: streaks, latches and trends all matter.
PATTERN = "b" * 15 + "g" * 5 + "b" * 15


def _events(det, records: list[Record]) -> list[Event]:
    return [e for r in records for e in det.update(r)]


def _resumed(make, records: list[Record], at: int) -> list[Event]:
    """Events of `records[:at]` through one object, then of the rest through a fresh one loaded with its state."""
    first = make()
    events = _events(first, records[:at])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain JSON values, no NaN or Inf
    second = make()
    second.load_state_dict(state)
    return events + _events(second, records[at:])


def _stream(kind: str) -> list[Record]:
    if kind == "nonfinite":
        return [rec(s, over={f"{M}/nonfinite/gates": 300.0} if s >= 300 else {}) for s in log_steps(len(PATTERN))]
    return FAULTS[kind].records(PATTERN)


KINDS = [*DETECTOR_KINDS, "nonfinite"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_detector_resumed_from_its_state_raises_what_it_would_have(kind):
    records = _stream(kind)
    whole = _events(DEFAULTS[kind](), records)
    assert whole, f"{kind}: the stream must raise something for the test to mean anything"
    for at in range(1, len(records)):
        assert _resumed(DEFAULTS[kind], records, at) == whole, f"{kind}: resumed after {at} records"


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_detector_without_the_state_would_differ(kind):
    records = _stream(kind)
    whole = _events(DEFAULTS[kind](), records)
    first = [r.step for r in records].index(whole[0].step)
    # Forgotten: a latch after the fault was raised (raised again), or before it, a streak or a best validation
    # loss (overfitting: the run's best is then a worse one, and the rise above it is missed).
    forgetful = [_events(DEFAULTS[kind](), records[:at]) + _events(DEFAULTS[kind](), records[at:])
                 for at in (max(first - 1, 1), first + 2)]
    assert any(f != whole for f in forgetful)


def _mixed(seed: int, n: int = 120) -> list[Record]:
    """Every planted fault now and then, a noisy loss that sometimes jumps or goes NaN, validation losses."""
    rng = random.Random(seed)
    healthy = rec(1).stats
    faults = [{k: v for k, v in f.bad(0, 1).stats.items() if healthy.get(k) != v and not k.startswith("loss")}
              for f in FAULTS.values()]
    out, level, nan_at = [], 1.0, None
    for s in log_steps(n, 10):
        over: dict[str, float] = {}
        for f in faults:
            if rng.random() < 0.1:
                over.update(f)
        level *= rng.choice([1.0, 0.9, 0.97, 1.1, 3.0 if rng.random() < 0.2 else 1.0])
        loss = math.nan if rng.random() < 0.02 else level * (1 + rng.uniform(-0.2, 0.2))
        if math.isnan(loss) and nan_at is None:
            nan_at = float(s)
        if nan_at is not None:
            over["nonfinite_loss"] = nan_at  # the first step the loss was NaN, as the watcher reports it
        val = rng.uniform(0.3, 1.5) if rng.random() < 0.4 else None
        out.append(rec(s, loss, over, val_loss=val, layers=3 if seed % 2 else 1))
    return out


SEEDS = [0, 3, 5, 6]


def test_the_mixed_streams_raise_every_kind_between_them():
    assert {e.kind for seed in SEEDS for e in _events(Detectors.default(), _mixed(seed))} == set(DEFAULTS)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_suite_resumed_from_its_state_raises_what_it_would_have(seed):
    records = _mixed(seed)
    whole = _events(Detectors.default(), records)
    assert len({e.kind for e in whole}) >= 5
    for at in range(1, len(records), 7):
        assert _resumed(Detectors.default, records, at) == whole, f"resumed after {at} records"
    at = len(records) // 2
    assert _events(Detectors.default(), records[:at]) + _events(Detectors.default(), records[at:]) != whole


def test_a_suite_refuses_the_state_of_other_detectors():
    state = Detectors.default(padding=False).state_dict()
    with pytest.raises(ValueError, match="do not match"):
        Detectors.default().load_state_dict(state)


def test_a_loss_trend_resumed_from_its_state_reads_the_same():
    records = _mixed(0)
    whole, half, fresh = LossTrend(), LossTrend(), LossTrend()
    for r in records:
        whole.update(r)
    for r in records[:60]:
        half.update(r)
    fresh.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for r in records[60:]:
        fresh.update(r)
    assert fresh.state_dict() == whole.state_dict()
    assert (fresh.level0(2), fresh.level0(), fresh.best(), fresh.best(-1.0), fresh.improvement()) == (
        whole.level0(2), whole.level0(), whole.best(), whole.best(-1.0), whole.improvement())


def test_nonfinite_stays_raised_across_a_resume():
    det = NonFinite()
    assert det.update(rec(16, over={f"{M}/nonfinite/data": 15.0}))
    again = NonFinite()
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert again.update(rec(32, over={f"{M}/nonfinite/data": 15.0})) == []
