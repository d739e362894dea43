"""diagnose(): events ranked into root causes with their consequences; the summary text; the remedies it points to."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from torch import nn

import lstmwatch.demo.scenarios as S
from lstmwatch.diagnose import CAUSES, PRIORITY, Finding, diagnose, summary
from lstmwatch.events import WARNINGS, Event
from lstmwatch.remedies import set_forget_bias

M = "lstm"


def ev(step: int, kind: str, module: str = M, message: str = "", severity: str = "warning", where: str = "") -> Event:
    if kind == "nonfinite":
        severity = "error"
    return Event(step, kind, severity, module, message or f"{kind} measured.", f"fix {kind}.", where)


def roots(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.kind, f.module) for f in findings]


def explained(finding: Finding) -> list[str]:
    return [c.kind for c in finding.consequences]


@cache
def run(name: str, steps: int):
    return S.run(S.BY_NAME[name], steps=steps, console=False)


# --- the tables


def test_cause_tables_name_only_known_kinds():
    assert set(PRIORITY) == set(WARNINGS)
    for cause, effects in CAUSES.items():
        assert cause in WARNINGS and set(effects) <= set(WARNINGS) and cause not in effects


# --- ranking synthetic events


def test_no_events_no_findings():
    assert diagnose([]) == []
    text = summary([], steps=300, modules=["enc", "dec"])
    assert text == "lstmwatch: 300 steps watched on enc, dec: no problem found."


def test_nan_in_the_input_is_the_root_not_the_exploding_gradient_that_follows():
    events = [
        ev(32, "exploding_gradient"),
        ev(32, "diverging_loss", ""),
        ev(50, "gate_saturation"),
        ev(16, "nonfinite", message="a NaN or Inf first appeared in the input batch of lstm at step 15.", where="data"),
    ]
    for seed in range(5):  # the order the events arrive in does not matter
        random.Random(seed).shuffle(events)
        (f,) = diagnose(events)
        assert (f.kind, f.module, f.cause.severity) == ("nonfinite", M, "error")
        assert sorted(explained(f)) == ["diverging_loss", "exploding_gradient", "gate_saturation"]


def test_nan_in_the_input_stays_a_root_after_an_unrelated_earlier_explosion():
    # Nothing a gradient does puts a NaN into the input batch.
    events = [
        ev(4, "exploding_gradient"),
        ev(16, "nonfinite", message="a NaN or Inf first appeared in the input batch of lstm at step 15.", where="data"),
    ]
    assert ("nonfinite", M) in roots(diagnose(events))


def test_cause_and_effect_come_from_where_not_from_the_message():
    # The site decides: a NaN first seen in the gates is explained by an earlier explosion whatever its words say,
    # and one first seen in the data stays a root whatever they say.
    gates = ev(16, "nonfinite", message="a NaN or Inf first appeared in the input batch of lstm.", where="gates")
    assert roots(diagnose([ev(4, "exploding_gradient"), gates])) == [("exploding_gradient", M)]
    data = ev(16, "nonfinite", message="a NaN or Inf first appeared somewhere.", where="data")
    assert ("nonfinite", M) in roots(diagnose([ev(4, "exploding_gradient"), data]))


def test_unnormalized_input_explains_the_saturation_it_causes():
    events = [
        ev(1, "unnormalized_input"),
        ev(2, "gate_saturation"),
        ev(2, "hidden_saturation"),
        ev(100, "vanishing_gradient"),
        ev(200, "stalled_loss", ""),
    ]
    (f,) = diagnose(events)
    assert f.kind == "unnormalized_input"
    assert sorted(explained(f)) == ["gate_saturation", "hidden_saturation", "stalled_loss", "vanishing_gradient"]


def test_a_cause_in_one_module_does_not_explain_a_finding_in_another():
    events = [ev(1, "unnormalized_input", "enc"), ev(2, "gate_saturation", "dec")]
    assert roots(diagnose(events)) == [("unnormalized_input", "enc"), ("gate_saturation", "dec")]


def test_a_cause_does_not_explain_what_came_before_it():
    events = [ev(2, "gate_saturation"), ev(50, "unnormalized_input")]
    assert sorted(roots(diagnose(events))) == [("gate_saturation", M), ("unnormalized_input", M)]


def test_a_run_wide_finding_explains_and_is_explained_across_modules():
    events = [ev(4, "no_gradient", "enc"), ev(200, "stalled_loss", "")]
    (f,) = diagnose(events)
    assert (f.kind, explained(f)) == ("no_gradient", ["stalled_loss"])


def test_independent_faults_are_separate_roots_in_priority_order():
    events = [ev(400, "overfitting", ""), ev(2, "padding"), ev(1, "exploding_gradient", "other")]
    assert [f.kind for f in diagnose(events)] == ["padding", "exploding_gradient", "overfitting"]


def test_repeated_events_count_under_their_first():
    events = [ev(4, "vanishing_gradient"), ev(50, "vanishing_gradient"), ev(900, "vanishing_gradient")]
    (f,) = diagnose(events)
    assert (f.count, f.cause.step, f.consequences) == (3, 4, [])


def test_info_events_rank_after_warnings():
    events = [ev(1, "no_gradient", "frozen", severity="info"), ev(100, "padding")]
    assert [f.kind for f in diagnose(events)] == ["padding", "no_gradient"]


def test_a_nan_loss_after_an_explosion_is_its_consequence():
    events = [
        ev(4, "exploding_gradient"),
        ev(4, "diverging_loss", ""),
        ev(8, "diverging_loss", ""),
        ev(16, "nonfinite", "", "a NaN or Inf first appeared in the loss at step 15.", where="loss"),
    ]
    findings = diagnose(events)
    assert roots(findings)[0] == ("exploding_gradient", M)
    assert "nonfinite" in explained(findings[0])


@pytest.mark.parametrize("cause", ["exploding_gradient", "diverging_loss"])
def test_a_learning_rate_blow_up_is_named_not_its_consequences(cause):
    # Weights blown up saturate the gates; their gradients are then zero or vanish, updates fall below the
    # weights' resolution. The root is the step size, whatever rank the consequences' kinds have as roots.
    events = [ev(4, cause, M if cause == "exploding_gradient" else ""), ev(8, "gate_saturation"),
              ev(8, "hidden_saturation"), ev(16, "no_gradient"), ev(32, "vanishing_gradient"), ev(50, "not_updated")]
    (f,) = diagnose(events)
    assert f.kind == cause
    assert explained(f) == ["gate_saturation", "hidden_saturation", "no_gradient", "vanishing_gradient",
                            "not_updated"]
    # A zero gradient before any blow-up is its own root (a detached output, say).
    assert roots(diagnose([ev(2, "no_gradient"), ev(4, cause)]))[0] == ("no_gradient", M)


def test_an_earlier_cause_explains_a_later_finding_whatever_their_priority():
    events = [
        ev(2, "gate_saturation"),
        ev(2, "hidden_saturation"),
        ev(100, "vanishing_gradient"),
        ev(200, "stalled_loss", ""),
    ]
    findings = diagnose(events)
    assert roots(findings) == [("gate_saturation", M)]
    assert sorted(explained(findings[0])) == ["hidden_saturation", "stalled_loss", "vanishing_gradient"]


def test_summary_text():
    events = [
        ev(1, "unnormalized_input", message="inputs far from zero mean."),
        ev(2, "gate_saturation"),
        ev(2, "gate_saturation"),
        ev(60, "overfitting", "", "val rises."),
    ]
    text = summary(diagnose(events), steps=300, modules=[M])
    assert text == (
        "lstmwatch: 300 steps watched on lstm: 2 root cause(s), most likely first.\n"
        "1. [warning] unnormalized_input in lstm, from step 1\n"
        "   inputs far from zero mean.\n"
        "   fix: fix unnormalized_input.\n"
        "   -> which explains gate_saturation in lstm (step 2)\n"
        "2. [warning] overfitting, from step 60\n"
        "   val rises.\n"
        "   fix: fix overfitting."
    )


# --- real runs


def test_watcher_diagnose_on_nan_input():
    w = run("nan_input", 40)
    (f,) = w.diagnose()
    assert (f.kind, f.module, f.cause.step) == ("nonfinite", M, 15)  # the step the NaN appears
    assert "input batch" in f.cause.message and f.cause.where == "data"


def test_watcher_diagnose_on_unnormalized_input():
    w = run("unnormalized_input", 8)
    f = w.diagnose()[0]
    assert f.kind == "unnormalized_input" and "gate_saturation" in explained(f)
    text = w.summary()
    assert text == str(w)
    assert text.startswith("lstmwatch: 8 steps watched on lstm: 1 root cause(s), most likely first.\n")
    assert "1. [warning] unnormalized_input in lstm, from step 1" in text
    assert "   -> which explains gate_saturation in lstm (step 2)" in text


def test_watcher_diagnose_on_a_learning_rate_too_high():
    w = run("lr_too_high", 20)
    assert w.diagnose()[0].kind in ("exploding_gradient", "diverging_loss")


def test_watcher_diagnose_on_gate_biases_that_saturate_the_cell():
    w = run("hidden_saturation", 100)
    (f,) = w.diagnose()
    assert f.kind == "gate_saturation"
    assert "hidden_saturation" in explained(f)


def test_watcher_summary_on_a_healthy_run():
    w = run("healthy_forecast", 16)
    assert w.diagnose() == []
    assert str(w) == "lstmwatch: 16 steps watched on lstm: no problem found."


# --- remedies.set_forget_bias: the fix the hints point to


def forget_bias(lstm: nn.LSTM | nn.LSTMCell, suffix: str) -> torch.Tensor:
    h = lstm.hidden_size
    return getattr(lstm, "bias_ih" + suffix)[h : 2 * h] + getattr(lstm, "bias_hh" + suffix)[h : 2 * h]


def suffixes(lstm) -> list[str]:
    if isinstance(lstm, nn.LSTMCell):
        return [""]
    d = ("", "_reverse") if lstm.bidirectional else ("",)
    return [f"_l{k}{r}" for k in range(lstm.num_layers) for r in d]


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LSTM(3, 5),
        lambda: nn.LSTM(3, 5, num_layers=3, bidirectional=True),
        lambda: nn.LSTM(3, 6, proj_size=2, batch_first=True),
        lambda: nn.LSTMCell(3, 5),
    ],
    ids=["lstm", "stacked_bidirectional", "proj_size", "cell"],
)
@pytest.mark.parametrize("value", [1.0, 0.5, -2.0])
def test_set_forget_bias_sets_the_effective_bias_exactly(make, value):
    lstm = make()
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    assert set_forget_bias(lstm, value) == 1
    h = lstm.hidden_size
    for sfx in suffixes(lstm):
        assert torch.equal(forget_bias(lstm, sfx), torch.full((h,), value))
    for n, p in lstm.named_parameters():  # only the forget blocks of the biases changed
        if n.startswith("bias"):
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[h : 2 * h] = False
            assert torch.equal(p[keep], before[n][keep]), n
        else:
            assert torch.equal(p, before[n]), n


def test_set_forget_bias_counts_every_lstm_in_a_model_and_keeps_training_working():
    model = nn.ModuleDict(
        {
            "enc": nn.LSTM(3, 4),
            "gru": nn.GRU(3, 4),
            "dec": nn.Sequential(nn.LSTM(4, 4)),
            "cell": nn.LSTMCell(4, 4),
            "nobias": nn.LSTM(3, 4, bias=False),
        }
    )
    assert set_forget_bias(model) == 3
    assert torch.equal(forget_bias(model["enc"], "_l0"), torch.ones(4))
    assert model["enc"].bias_ih_l0.requires_grad
    out, _ = model["enc"](torch.randn(5, 2, 3))
    out.sum().backward()
    assert model["enc"].bias_ih_l0.grad is not None


@pytest.mark.parametrize(
    "model", [nn.GRU(3, 4), nn.LSTM(3, 4, bias=False), nn.Linear(3, 4)], ids=["gru", "no_bias", "linear"]
)
def test_set_forget_bias_without_any_lstm_bias_raises(model):
    with pytest.raises(ValueError, match="no nn.LSTM"):
        set_forget_bias(model)


def test_inputs_that_grew_after_the_weights_blew_up_hang_under_the_explosion():
    # Adam at a word LM's SGD learning rate: the update blows the embedding up at step 1, the LSTM's inputs (the
    # embedding's output) read unnormalized only from step 2. The cause is the learning rate, not the data.
    found = diagnose([ev(1, "exploding_gradient"), ev(2, "unnormalized_input"), ev(2, "gate_saturation"),
                      ev(16, "diverging_loss", module="")])
    assert roots(found) == [("exploding_gradient", M)]
    assert explained(found[0]) == ["unnormalized_input", "gate_saturation", "diverging_loss"]


def test_inputs_unnormalized_from_the_start_stay_the_root():
    found = diagnose([ev(1, "unnormalized_input"), ev(1, "exploding_gradient"), ev(2, "gate_saturation")])
    assert roots(found) == [("unnormalized_input", M)]
    assert explained(found[0]) == ["exploding_gradient", "gate_saturation"]
