"""The default detectors on small real training runs: each planted fault is found, healthy runs stay silent."""

from __future__ import annotations

from functools import cache

import pytest
import torch

import lstmwatch
import lstmwatch.demo.scenarios as S

# Steps each fault run needs: the first logging step after the fault shows (records at 1, 2, 4, 8, 16, 32, 50, ...),
# with one more record of margin.
FAULT_STEPS = {
    "unnormalized_input": 4,
    "lr_too_high": 8,
    "lr_too_low": 8,
    "padding": 4,
    "deep_long": 4,  # the slowest run: 6 layers over 200 steps
    "nan_input": 16,  # the NaN enters at step 15
    "no_gradient": 4,
    "not_updated": 4,
    "exploding": 4,
    "gate_saturation": 4,
    "hidden_saturation": 4,
    "overfitting": 60,  # validation every 5 steps; it must rise for 3 evaluations after its best
    # The architectures people build around nn.LSTM.
    "seq2seq_detached": 4,
    "checkpointed_unnormalized": 4,
    "gru_lr_too_high": 4,
    "gru_unnormalized": 4,
}
HEALTHY = [s.name for s in S.SCENARIOS if not s.expected]
# tests/conftest.py runs torch on one thread: these models are tiny, and one thread beats contended ones.


@cache
def run(name: str, steps: int):
    """One closed Watcher per (scenario, steps), shared by the tests that only read it."""
    return S.run(S.BY_NAME[name], steps=steps, console=False)


def test_every_fault_scenario_is_covered():
    assert set(FAULT_STEPS) == {s.name for s in S.SCENARIOS if s.expected}


@pytest.mark.parametrize("name", sorted(FAULT_STEPS))
def test_fault_run_raises_its_kind(name):
    sc = S.BY_NAME[name]
    w = run(name, FAULT_STEPS[name])
    found = {e.kind for e in w.events}
    assert found & set(sc.expected), f"{name}: expected one of {sc.expected}, got {sorted(found)}"
    first = next(e for e in w.events if e.kind in sc.expected)
    assert first.severity in ("warning", "error") and first.message and first.hint
    assert w.closed and not any(e.step > FAULT_STEPS[name] for e in w.events)


@pytest.mark.parametrize(
    "name, kind, module, words",
    [
        ("nan_input", "nonfinite", "lstm", "the input batch of lstm at step 15"),
        ("lr_too_low", "stalled_loss", "", "the learning rate is too low"),
        ("padding", "padding", "lstm", "trailing all-zero steps"),
        ("deep_long", "vanishing_gradient", "lstm", "layer 0 gets"),
        ("no_gradient", "no_gradient", "lstm", "no gradient reached its parameters"),
        ("not_updated", "not_updated", "lstm", "did not change"),
        ("unnormalized_input", "unnormalized_input", "lstm", "means up to"),
        ("gate_saturation", "gate_saturation", "lstm", "input gate of layer l0"),
        ("hidden_saturation", "hidden_saturation", "lstm", "of layer l0"),
    ],
)
def test_fault_run_names_the_module_and_the_cause(name, kind, module, words):
    w = run(name, FAULT_STEPS[name])
    e = next(e for e in w.events if e.kind == kind)
    assert e.module == module
    assert words in e.message


def test_nan_input_is_an_error_raised_once():
    w = S.run(S.BY_NAME["nan_input"], steps=60, console=False)
    nonfinite = [e for e in w.events if e.kind == "nonfinite"]
    # Reported at the step the NaN appears (15), not at the next logging step (16).
    assert [(e.step, e.severity) for e in nonfinite] == [(15, "error")]
    assert "at step 15" in nonfinite[0].message


def test_overfitting_waits_for_rising_validation_losses():
    w = run("overfitting", FAULT_STEPS["overfitting"])
    e = next(e for e in w.events if e.kind == "overfitting")
    vals = [r.val_loss for r in w.records if r.val_loss is not None]
    assert len(vals) == FAULT_STEPS["overfitting"] // 5
    assert e.module == "" and "validation loss has not improved" in e.message


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_raises_no_warning(name):
    w = run(name, 100)
    loud = [(e.step, e.kind, e.message) for e in w.events if e.severity != "info"]
    assert loud == []
    assert len(w.records) >= 8
    assert "no problem found" in w.summary()


def test_a_persistent_fault_is_raised_once_in_a_longer_run():
    # Padding is in every batch of this run: one warning, not one per logging step.
    w = S.run(S.BY_NAME["padding"], steps=300, console=False)
    assert [e.kind for e in w.events].count("padding") == 1
    assert len(w.records) == 12


def test_a_learning_rate_too_low_is_raised_once():
    w = run("lr_too_low", 60)
    assert [e.step for e in w.events if e.kind == "stalled_loss"] == [4]


READS = {
    # Where the loss reads the recurrence decides where dL/dh enters: only the top layer's forward direction
    # on a loss at the last step says anything of growth back through time.
    "bidirectional, last step": (torch.nn.LSTM, {"bidirectional": True}, "last"),
    "bidirectional 2 layers, h_n": (torch.nn.LSTM, {"num_layers": 2, "bidirectional": True}, "h_n"),
    "3 layers, every step": (torch.nn.LSTM, {"num_layers": 3}, "every"),
    "GRU bidirectional, h_n": (torch.nn.GRU, {"bidirectional": True}, "h_n"),
}


@pytest.mark.parametrize("rnn, kw, read", READS.values(), ids=READS.keys())
def test_healthy_architectures_read_anywhere_stay_silent(rnn, kw, read):
    torch.manual_seed(0)
    model = rnn(4, 16, batch_first=True, **kw)
    d = 2 if model.bidirectional else 1
    head = torch.nn.Linear(d * 16 if read != "h_n" else 16, 1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    with lstmwatch.watch(model, log_every=5, console=False) as w:
        for _ in range(120):
            x = torch.randn(16, 20, 4)
            y = x[..., 0].cumsum(1)[..., None] / 20 ** 0.5  # (16, 20, 1) a running sum to remember
            out, state = model(x)
            h_n = state[0] if isinstance(state, tuple) else state
            if read == "last":
                loss = (head(out[:, -1]) - y[:, -1]).pow(2).mean()
            elif read == "h_n":
                loss = (head(h_n[-1]) - y[:, -1]).pow(2).mean()
            else:
                loss = (head(out) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
    assert w.records[-1].loss < 0.7 * w.records[0].loss  # it learns
    assert [e for e in w.events if e.severity != "info"] == []


@pytest.mark.parametrize("batch", [1, 4])
def test_every_step_on_small_noisy_batches_stays_silent(batch):
    # Records every step carry one small batch's loss: the loss detectors smooth it over 50 steps.
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(4, 16, batch_first=True), torch.nn.Linear(16, 1)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    with lstmwatch.watch(lstm, log_every=1, console=False) as w:
        for step in range(300):
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(batch, 20, 4, generator=g)
            y = x[..., 0].mean(1) * 20 ** 0.5
            loss = ((head(lstm(x)[0]).mean(1).squeeze(-1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
            losses.append(loss.item())
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])  # it learns
    assert [e for e in w.events if e.severity != "info"] == []
