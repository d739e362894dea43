"""The tape of per-step values: sums, means, the last value and the first non-finite step, against plain Python."""

from __future__ import annotations

import math

import pytest
import torch

import lstmwatch
from lstmwatch.tape import SLOTS, Tape


def _reference(losses: dict[int, float]) -> tuple[float, int, float, float]:
    steps = sorted(losses)
    bad = [s for s in steps if not math.isfinite(losses[s])]
    return sum(losses[s] for s in steps), len(steps), losses[steps[-1]], float(bad[0]) if bad else math.inf


@pytest.mark.parametrize("n,gaps,bad_at", [
    (5, (), None),
    (SLOTS, (), None),  # exactly one full buffer
    (3 * SLOTS + 7, (), 2 * SLOTS + 3),  # folds mid-way; the fault in the third buffer
    (150, (10, 11, 90), 12),  # steps without a loss: a gap folds, and the slots stay dated right
    (150, (), 1),
])
def test_the_tape_reduces_like_python(n: int, gaps: tuple[int, ...], bad_at: int | None):
    g = torch.Generator().manual_seed(n)
    losses = {}
    tape = Tape()
    for s in range(1, n + 1):
        if s in gaps:
            continue
        v = float(torch.rand((), generator=g)) * 3
        if bad_at is not None and s >= bad_at and s % 2 == bad_at % 2:
            v = math.nan if s == bad_at else math.inf
        losses[s] = v
        tape.add(torch.tensor(v), s)
    tape.fold()
    total, count, last, first = _reference(losses)
    assert tape.n == count
    assert tape.last is not None and tape.sum is not None and tape.first_bad is not None
    if bad_at is None:
        assert float(tape.sum) == pytest.approx(total, rel=1e-5)
        assert float(tape.last) == pytest.approx(last, rel=1e-6)
    else:
        assert not math.isfinite(float(tape.sum))
    assert float(tape.first_bad) == first


def test_a_reused_loss_tensor_is_copied_at_once():
    # A loss tensor written in place after step() (or a CUDA graph's output, replayed) cannot change the record.
    tape = Tape()
    buf = torch.zeros(())
    for s in range(1, 11):
        buf.fill_(float(s))
        tape.add(buf, s)
    tape.fold()
    assert float(tape.sum) == sum(range(1, 11)) and float(tape.last) == 10.0


def test_float64_losses_keep_their_precision_and_a_dtype_change_folds():
    tape = Tape()
    tape.add(torch.tensor(1.0, dtype=torch.float64) + 1e-12, 1)
    tape.add(torch.tensor(1e300, dtype=torch.float64), 2)  # finite in float64: not a fault
    tape.add(torch.tensor(2.0, dtype=torch.float32), 3)
    tape.fold()
    assert tape.n == 3 and math.isinf(float(tape.first_bad))
    assert float(tape.sum) == pytest.approx(1e300)


def test_state_round_trip_restarts_the_mean_but_keeps_the_first_fault():
    tape = Tape()
    for s, v in enumerate([1.0, math.nan, 3.0], start=1):
        tape.add(torch.tensor(v), s)
    state = tape.state()
    assert state["n"] == 3 and state["first_nonfinite"] == 2.0
    other = Tape()
    other.load(state)
    other.restart()
    other.add(torch.tensor(5.0), 4)
    other.fold()
    assert other.n == 1 and float(other.sum) == 5.0 and float(other.first_bad) == 2.0


@pytest.mark.parametrize("inf_at", [None, 150])
def test_a_watcher_logs_the_interval_mean_over_more_steps_than_the_buffer_holds(inf_at: int | None):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4)
    w = lstmwatch.watch(lstm, log_every=200, console=False)
    values = [0.5 + 0.01 * s for s in range(1, 201)]
    if inf_at is not None:
        values[inf_at - 1] = math.inf
    records = {}
    for v in values:
        out, _ = lstm(torch.randn(5, 2, 3))
        out.sum().backward()
        rec = w.step(torch.tensor(v))
        if rec is not None:
            records[rec.step] = rec
    w.close()
    assert rec is not None and rec.step == 200
    assert rec.stats["loss"] == pytest.approx(values[-1])
    if inf_at is None:
        since = values[128:]  # the dense start logs 1, 2, 4, ..., 128 before 200
        assert rec.stats["loss_mean"] == pytest.approx(sum(since) / len(since), rel=1e-6)
        assert "nonfinite_loss" not in rec.stats
    else:
        # The Inf brings a record forward to its own step; the next one covers the steps after it.
        assert list(records) == [1, 2, 4, 8, 16, 32, 64, 128, inf_at, 200]
        assert records[inf_at].stats["loss_mean"] == math.inf
        assert records[inf_at].stats["nonfinite_loss"] == inf_at == rec.stats["nonfinite_loss"]
        since = values[inf_at:]
        assert rec.stats["loss_mean"] == pytest.approx(sum(since) / len(since), rel=1e-6)


def test_sites_dated_together_whatever_sets_of_sites_each_step_shows():
    # Each step's sums are dated at once; steps showing other sets of sites (parameters frozen on and off,
    # more sets than MAX_SITE_SETS) still date each site's first NaN/Inf to its own step.
    from lstmwatch.probes import base
    from lstmwatch.schedule import Clock

    probe = base.Probe("m", torch.nn.Linear(2, 2), Clock.start(1000))
    first: dict[str, int] = {}
    for step in range(1, 41):
        probe.clock.step = step
        sites = [f"s{k}" for k in range(step % (base.MAX_SITE_SETS + 5) + 1)]
        for site in sites:
            bad = step == 7 * (int(site[1:]) + 1)
            probe._mark_sum(site, torch.tensor(math.nan if bad else 1.0))
            if bad:
                first.setdefault(site, step)
        probe.date_sums()
    got = {site: float(v) for site, v in probe._firsts().items() if math.isfinite(float(v))}
    assert got == first and len(first) >= 4
    assert len(probe._tapes) == base.MAX_SITE_SETS
