"""A NaN or Inf is reported at the step it appears (by the next on a GPU), not at the next logging step.

The tripwire only brings a record forward; the tapes date the first non-finite value. Against the plain
facts of the run: which step the NaN was put in, and where (input, loss, a gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import lstmwatch
from lstmwatch.tripwire import Tripwire


def test_the_tripwire_trips_once_at_the_step_it_sees_a_nan():
    t = Tripwire()
    for step in range(1, 4):
        t.see(torch.ones(3))
        t.see(torch.tensor(2.0, dtype=torch.float64))
        t.see(torch.arange(3))  # integers cannot be NaN: not looked at
        t.arm(step)
        assert t.poll() is None
    t.see(torch.tensor([1.0, math.inf]))
    t.see(torch.ones(2))  # a finite write after the Inf does not hide it
    t.arm(4)
    assert t.poll() == 4 and t.tripped == 4
    assert t.poll() is None  # said once
    t.see(torch.tensor(math.nan))
    t.arm(5)
    assert t.poll() is None and t.tripped == 4 and not t.armed


def _train(steps: int, bad_step: int, where: str, log_every: int = 50):
    """A small forecaster; at `bad_step` a NaN enters the input, the loss or the LSTM's gradients."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 1)
    opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.01)
    w = lstmwatch.watch(lstm, log_every=log_every, console=False)
    for step in range(1, steps + 1):
        x = torch.randn(4, 10, 4)
        bad = step == bad_step
        if bad and where == "data":
            x[0, 3, 1] = math.nan
        out, _ = lstm(x)
        if bad and where == "grad":
            out.register_hook(lambda g: g * math.nan)  # the forward and the loss stay finite
        loss = head(out[:, -1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if not (bad and where == "loss"):
            opt.step()
        w.step(loss * math.inf if bad and where == "loss" else loss)
    w.close()
    return w


def test_a_nan_between_logging_steps_is_reported_at_its_own_step():
    for where, words in [("data", "the input batch of lstm"), ("loss", "the loss"), ("grad", "the gradient of")]:
        w = _train(70, 60, where)
        (e,) = [e for e in w.events if e.kind == "nonfinite"]
        assert e.step == 60 and f"{words}" in e.message and "at step 60" in e.message, (where, e.message)
        # One record brought forward, at the NaN's step; the schedule goes on as before (no record per step
        # for what follows it).
        assert [r.step for r in w.records] == [1, 2, 4, 8, 16, 32, 50, 60], where


def test_no_record_is_brought_forward_on_a_finite_run():
    w = _train(120, 0, "data")
    assert [r.step for r in w.records] == [1, 2, 4, 8, 16, 32, 50, 100]
    assert not w.events
