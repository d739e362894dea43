"""Long runs at log_every=1 do not flood: a persistent fault is raised once per kind and module, one that comes and
goes a few times at most, one that clearly worsens again within that cap; nothing a detector or the console keeps
grows with the run; options and detectors are refused at the call that gives them."""

from __future__ import annotations

import inspect
import json
import random
import re
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import torch
from test_detectors import FAULTS, M
from torch import nn

import lstmwatch
from lstmwatch.detectors import (
    DEFAULTS,
    Detectors,
    ExplodingGradient,
    Latch,
    NoGradient,
    NotUpdated,
    Padding,
    default_detectors,
)
from lstmwatch.events import Event, Record
from lstmwatch.sinks.console import ConsoleSink

# --- the records of an LSTM fed inputs x1000, one per step (log_every=1)


def _record(step: int, loss: float, g: float, ratio: float, sat: float, scale: float) -> Record:
    """A lean record of one LSTM 'lstm': only what the detectors read, so 100,000 of them take seconds."""
    stats = {
        "loss": loss, "loss_mean": loss, "grad_norm": g,
        f"{M}/grad_norm": g, f"{M}/grads_seen": 1.0, f"{M}/trainable": 1.0,
        f"{M}/l0/grad_norm": g, f"{M}/l0/update_ratio": ratio,
        f"{M}/data/feat_mean_absmax": scale, f"{M}/data/feat_std_max": 0.3 * scale, f"{M}/data/absmax": 1.8 * scale,
        f"{M}/data/pad_frac": 0.0,
        f"{M}/l0/input/sat_left": sat, f"{M}/l0/input/sat_right": 0.0, f"{M}/l0/c/sat": sat, f"{M}/l0/h/sat": sat,
    }
    return Record(step, loss, stats, {}, None, (M,))


def saturated(step: int, rng: random.Random) -> Record:
    """What a hidden-4 LSTM on inputs x1000 measures, step by step (benchmarks/flood.py): gates pinned, so the
    gradient is tiny or exactly 0 and the update below float32's resolution (ratio 0); on 1% of the batches some
    pre-activations reach the gates' linear range: a real spike (gradient 1, a step of 3% of the weights, the loss
    up); on 20%, a jump of 1e-3 from a level of 1e-9 that moves the weights by 3e-6 of their norm."""
    u = rng.random()
    if u < 0.01:
        g, ratio, loss = 1.0, 0.03, 0.5
    elif u < 0.2:
        g, ratio, loss = 1e-3, 3e-6, 0.3
    elif u < 0.4:
        g, ratio, loss = 0.0, 0.0, 0.1
    else:
        g, ratio, loss = 10 ** rng.uniform(-12, -7), 0.0, 0.1 * rng.uniform(0.5, 1.5)
    return _record(step, loss, g, ratio, rng.uniform(0.4, 1.0), 1000.0)


def healthy(step: int, rng: random.Random) -> Record:
    return _record(step, 0.1 * rng.uniform(0.8, 1.2), 0.3 * rng.uniform(0.5, 2.0), 1e-3, 0.0, 1.0)


def stream(n: int, faulty: Callable[[int], bool] = lambda s: True, seed: int = 0) -> Iterator[Record]:
    """n records, one per step; step 1 healthy (the optimizer moved the weights), then faulty where `faulty`."""
    rng = random.Random(seed)
    for s in range(1, n + 1):
        yield (saturated if s > 1 and faulty(s) else healthy)(s, rng)


def events_of(det: Any, records: Iterable[Record]) -> list[Event]:
    return [e for r in records for e in det.update(r)]


def per_key(events: list[Event]) -> Counter[tuple[str, str]]:
    return Counter((e.kind, e.module) for e in events)


def size(obj: Any, depth: int = 0) -> int:
    """How many items an object holds: the lengths of its containers, inside its attributes, all the way down."""
    if depth > 6 or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return 0
    if isinstance(obj, dict):
        return len(obj) + sum(size(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, deque)):
        return len(obj) + sum(size(v, depth + 1) for v in obj)
    return sum(size(v, depth + 1) for v in getattr(obj, "__dict__", {}).values())


# --- no flood


def test_a_persistent_fault_over_100k_records_raises_at_most_10_events_and_nothing_grows():
    suite = default_detectors()
    events: list[Event] = []
    sizes, state_leaves = [], []
    for r in stream(100_000):
        events += suite.update(r)
        if r.step in (20_000, 60_000, 100_000):
            sizes.append([size(d) for d in suite])
            state_leaves.append(len(json.dumps(suite.state_dict(), allow_nan=False).split(",")))
    assert len(events) <= 10, per_key(events)
    assert max(per_key(events).values()) <= 3, per_key(events)
    kinds = {e.kind for e in events}
    assert {"unnormalized_input", "gate_saturation", "exploding_gradient"} <= kinds
    # Updates below float32's resolution are not a missing optimizer; a zero gradient after gradients is not a
    # missing path; a jump of 1e-3 from 1e-9 that moves nothing is no explosion.
    assert not kinds & {"not_updated", "no_gradient"}, per_key(events)
    assert all(e.values["update_ratio"] >= 1e-3 for e in events if e.kind == "exploding_gradient")
    assert sizes[0] == sizes[1] == sizes[2], f"detector state grows with the run: {sizes}"
    assert state_leaves[0] == state_leaves[1] == state_leaves[2], state_leaves


def test_an_on_off_fault_is_raised_a_few_times_per_kind_and_module():
    period = 500  # on 500 steps, off 500: 20 periods
    events = events_of(default_detectors(), stream(20_000, lambda s: ((s - 1) // period) % 2 == 0))
    counts = per_key(events)
    assert max(counts.values()) <= 3, counts
    assert counts[("unnormalized_input", M)] == 3  # it cleared and came back: raised again, up to the cap


def test_a_fault_that_comes_and_goes_within_100_steps_is_one_fault():
    # On 300 steps, off 50: the fault never stays away for the 100 steps that clear it.
    events = events_of(default_detectors(), stream(20_000, lambda s: s % 350 < 300))
    assert per_key(events)[("unnormalized_input", M)] == 1, per_key(events)


FLICKER = [k for k in FAULTS if FAULTS[k].module]  # the faults of a module; the loss's are smoothed over 50 steps


@pytest.mark.parametrize("kind", FLICKER)
def test_a_fault_that_flickers_record_to_record_at_log_every_1_is_raised_once(kind):
    # Three records with the fault, three without, for 6,000 steps: a flickering condition, not six thousand
    # faults. Counted in records, two quiet ones cleared it and it was raised again every six steps.
    f = FAULTS[kind]
    records = [(f.bad if (s // 3) % 2 == 0 else f.good)(s, s) for s in range(1, 6001)]
    assert [e.kind for e in events_of(DEFAULTS[kind](), records)] == [kind]


def test_a_fault_that_worsens_10x_is_raised_again_within_the_cap():
    base = FAULTS["exploding_gradient"].good(0, 1)

    def step(s: int, ratio: float) -> Record:
        return Record(s, base.loss, {**base.stats, f"{M}/l0/update_ratio": ratio}, {}, None, (M,))

    # An optimizer step 5x the weights, then 50x, 500x, ...: each 10x worse, each for 1,000 steps.
    ratios = [5.0 * 10 ** (s // 1000) for s in range(5000)]
    events = events_of(ExplodingGradient(), (step(s, r) for s, r in enumerate(ratios, 1)))
    assert [(e.step, e.values["update_ratio"]) for e in events] == [(1, 5.0), (1001, 50.0), (2001, 500.0)]
    assert "one optimizer step changed the weights by 500 times their norm" in events[-1].message


def test_latch_clears_after_steps_not_records_and_caps_each_key():
    latch = Latch()  # clear_after=2 checks spanning clear_steps=100 steps; max_raises=3
    assert latch.check("m", True, step=1)
    assert not any(latch.check("m", s % 2 == 0, step=s) for s in range(2, 101))  # flickers: the same fault
    for s in range(101, 199):
        latch.check("m", False, step=s)
    assert not latch.check("m", True, step=199)  # 98 checks, 99 steps without it: not cleared
    for s in range(200, 301):
        latch.check("m", False, step=s)
    assert latch.check("m", True, step=301)  # 101 steps: cleared, then back
    assert latch.check("m", True, 10.0, step=302)  # clearly worse: the third time
    assert not latch.check("m", True, 1e6, step=303)  # the cap
    for s in range(304, 1000):
        latch.check("m", False, step=s)
    assert not latch.check("m", True, step=1000)
    assert latch.check("other", True, step=1000)  # keys are independent


def test_a_capped_latch_stays_capped_across_a_resume():
    det = ExplodingGradient()
    base = FAULTS["exploding_gradient"].good(0, 1)
    bad = FAULTS["exploding_gradient"].bad(0, 1)
    records = [Record(s, base.loss, (bad if (s // 200) % 2 == 0 else base).stats, {}, None, (M,))
               for s in range(1, 3001)]
    whole = events_of(ExplodingGradient(), records)
    assert len(whole) == 3  # comes back every 400 steps: raised three times, then no more
    first = events_of(det, records[:1500])
    again = ExplodingGradient()
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert first + events_of(again, records[1500:]) == whole


def test_a_latch_state_saved_before_seen_and_raised_existed_loads():
    latch = Latch()
    latch.load_state_dict({"fired": {"m": 1.0}, "quiet": {"m": 0}})
    assert not latch.check("m", True, step=5) and latch.check("m", True, 10.0, step=6)


# --- what is a fault: the decisions behind the flood


def _level(g: float, ratio: float, n: int = 20, start: int = 1) -> list[Record]:
    return [_record(s, 0.1, g, ratio, 0.0, 1.0) for s in range(start, start + n)]


def test_a_jump_from_a_tiny_level_that_moves_nothing_is_no_explosion():
    tiny = _level(5e-5, 1e-7)
    # 20x its running level, the loss up 5x, but the step moved the weights by 3e-6 of their norm.
    assert events_of(ExplodingGradient(), [*tiny, _record(21, 0.5, 1e-3, 3e-6, 0.0, 1.0)]) == []
    e = events_of(ExplodingGradient(), [*tiny, _record(21, 0.5, 1e-3, 0.03, 0.0, 1.0)])
    assert [x.kind for x in e] == ["exploding_gradient"]
    assert e[0].message.startswith("the gradient norm jumped to 0.001, 20x its running level of 5.00e-05 "
                                   "(threshold 10x), and the step raised the loss.")
    assert events_of(ExplodingGradient(harmless_update=0.1), [*tiny, _record(21, 0.5, 1e-3, 0.03, 0.0, 1.0)]) == []


def test_updates_below_float32_resolution_are_not_a_missing_optimizer():
    moved = _level(1e-2, 1e-4, n=5)  # the optimizer moves it: 1e-2 of the weights per unit of gradient
    below = _level(1e-9, 0.0, n=20, start=6)  # 1e-11 of the weights: rounds away in float32
    assert events_of(NotUpdated(), moved + below) == []
    # The same gradients with a zero step, but a gradient that would move the weights by 1e-4: lr 0.
    e = events_of(NotUpdated(), moved + _level(1e-2, 0.0, n=5, start=6))
    assert [x.step for x in e] == [7] and "did not change at all on 2 logging steps" in e[0].message
    # Never moved from the start: missing from the optimizer, whatever the gradient's size.
    assert [x.step for x in events_of(NotUpdated(), _level(1e-9, 0.0, n=5))] == [2]
    assert events_of(NotUpdated(resolution=1e-12), moved + below) != []


def test_a_zero_gradient_after_gradients_is_underflow_not_a_missing_path():
    had = _level(1e-3, 1e-4, n=3)
    zero = _level(0.0, 0.0, n=20, start=4)
    assert events_of(NoGradient(), had + zero) == []
    e = events_of(NoGradient(), _level(0.0, 0.0, n=5))
    assert [x.step for x in e] == [2] and "exactly zero" in e[0].message
    none = [Record(r.step, r.loss, {**r.stats, f"{M}/grads_seen": 0.0}, {}, None, (M,)) for r in zero]
    assert [x.step for x in events_of(NoGradient(), had + none)] == [5]  # no gradient at all: always a fault


# --- a real run


def test_a_real_run_at_log_every_1_with_unnormalized_inputs_warns_a_few_times():
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 4), nn.Linear(4, 1)
    opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.01)
    xs = torch.randn(16, 5, 4, 3) * 1000.0
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with lstmwatch.watch(lstm, log_every=1) as w:
            for s in range(400):
                out, _ = lstm(xs[s % 16])
                loss = head(out[-1]).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                w.step(loss)
    ours = Counter(x.category.__name__ for x in log if issubclass(x.category, lstmwatch.LSTMWatchWarning))
    assert sum(ours.values()) <= 6 and max(ours.values()) <= 3, ours
    assert ours["UnnormalizedInputWarning"] == 1
    assert not {"NotUpdatedWarning", "NoGradientWarning"} & set(ours), ours


# --- the console keeps a count, not every event


def test_the_console_keeps_a_count_per_kind_and_the_first_few():
    sink = ConsoleSink()
    r = _record(1, 0.1, 0.3, 1e-3, 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(10_000):
            sink.write(r, [Event(s, "padding", "warning", M, "m.", "h."), Event(s, "stalled_loss", "info", "", "i.",
                                                                             "h.")])
    assert sink.counts == {"padding": 10_000} and len(sink.first) == sink.keep and sink.first[0].step == 0
    assert size(sink) <= 2 * sink.keep


# --- options refused at the call


def test_a_value_neither_a_dict_nor_a_bool_is_refused_naming_the_kind():
    with pytest.raises(TypeError, match=r"detectors\['padding'\] must be a dict of Padding's options") as info:
        default_detectors(padding=5)
    assert "False to leave it out" in str(info.value) and "threshold, patience" in str(info.value)
    with pytest.raises(TypeError, match="NonFinite"):
        default_detectors(nonfinite={"patience": 2})


@pytest.mark.parametrize("kind", sorted(k for k, c in DEFAULTS.items() if inspect.signature(c).parameters))
def test_a_misspelt_option_lists_the_valid_ones(kind):
    names = list(inspect.signature(DEFAULTS[kind]).parameters)
    with pytest.raises(TypeError) as info:
        default_detectors(**{kind: {names[0] + "s": 1}})
    msg = str(info.value)
    assert f"detectors[{kind!r}]" in msg and f"did you mean {names[0]!r}" in msg
    assert f"its options: {', '.join(names)}" in msg


def test_an_option_that_is_not_a_number_is_refused():
    with pytest.raises(TypeError, match=r"detectors\['stalled_loss'\]\['patience'\] must be a number"):
        default_detectors(stalled_loss={"patience": "500"})
    with pytest.raises(TypeError, match="must be a number"):
        default_detectors(padding={"threshold": True})
    assert default_detectors(stalled_loss={"patience": 500, "min_delta": 0, "mode": "max"})


@pytest.mark.parametrize("given, says", [
    (["x"], re.escape("detectors: 'x' (str) is not a detector: a detector needs `kind` (a str) and `update(record)`")),
    ([object()], "a detector needs `kind`"),
    ([Padding], r"pass an instance, `Padding\(\)`"),
    (5, "detectors must be a list of detectors"),
    ("padding", "detectors must be a list of detectors"),
], ids=["str", "object", "class", "int", "a string"])
def test_what_is_not_a_detector_is_refused(given, says):
    with pytest.raises(TypeError, match=says):
        Detectors(given)


@pytest.mark.parametrize("detectors", [{"padding": 5}, {"stalled_loss": {"patiense": 5}}, ["x"]])
def test_watch_refuses_bad_detectors_before_hooking_anything(detectors):
    lstm = nn.LSTM(3, 4)
    with pytest.raises(TypeError, match="detectors"):
        lstmwatch.watch(lstm, detectors=detectors)
    assert not lstm._forward_hooks and not lstm._forward_pre_hooks
