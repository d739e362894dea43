"""Parameters are read as they are now: one re-created after watch() is the one hooked and measured, a module
replaced after watch() gets a note instead of a false no-gradient warning, and torch.func.functional_call,
whose forward runs with parameters that are not the module's, gets a note, no crash and no false warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lstmwatch

F, H, T, B = 3, 5, 7, 4
STEPS = 10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[-1]).pow(2).mean()


def batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(T, B, F, generator=g) for _ in range(n)]


def forget_bias(lstm):
    """bias_ih_l0 with its forget-gate block at +10: the forget gate saturated at 1."""
    b = lstm.bias_ih_l0.detach().clone()
    b[H:2 * H] = 10.0
    return nn.Parameter(b)


def big_recurrent(lstm):
    """weight_hh_l0 ten times larger: gates pushed to their bounds."""
    return nn.Parameter(lstm.weight_hh_l0.detach() * 10 + 1.0)


def train(change, watched: bool, **kw):
    """STEPS SGD steps of a fresh Net, `change(model)` applied after watch(); the parameters after, the records,
    per step (gates computed independently before the forward, autograd's gradient norms), and the warnings."""
    torch.manual_seed(0)
    model = Net()
    w = lstmwatch.watch(model, log_every=1, sample=B, console=False, **kw) if watched else None
    change(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in batches():
            ref = lstmwatch.lstm_gates(model.lstm, x)[0] if isinstance(model.lstm, nn.LSTM) else None
            loss = model(x)
            loss.backward()
            norms = {n: p.grad.norm().item() for n, p in model.lstm.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad()
            rec = w.step(loss) if w is not None else None
            seen.append((ref, norms, rec))
    if w is not None:
        w.close()
    return [p.detach().clone() for p in model.parameters()], seen, w, caught


def assert_same_training(change):
    a, _, _, _ = train(change, watched=False)
    b, _, _, _ = train(change, watched=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "lstmwatch changed training"


def ours(caught, cls=lstmwatch.LSTMWatchWarning):
    return [str(c.message) for c in caught if issubclass(c.category, cls)]


@pytest.mark.parametrize("pname, make", [("bias_ih_l0", forget_bias), ("weight_hh_l0", big_recurrent)])
def test_a_parameter_recreated_after_watch_is_the_one_measured(pname, make):
    def change(model):
        setattr(model.lstm, pname, make(model.lstm))
        # nn.LSTM's forward reads _flat_weights, kept in sync by its __setattr__: the new tensor runs.
        assert any(t is getattr(model.lstm, pname) for t in model.lstm._flat_weights)

    _, seen, w, caught = train(change, watched=True)
    assert ours(caught) == []
    for ref, norms, rec in seen:
        for gate in ("input", "forget", "output"):
            want = (getattr(ref, gate[0]) > 0.9).float().mean().item()
            assert rec.stats[f"lstm/l0/{gate}/sat_right"] == pytest.approx(want, abs=1e-6), (rec.step, gate)
        for n, g in norms.items():
            assert rec.stats[f"lstm/{n}/grad_norm"] == pytest.approx(g, rel=1e-5), (rec.step, n)
        assert rec.stats["lstm/grads_seen"] == 1.0
    if pname == "bias_ih_l0":  # the forget gate saturated: what the old tensor would have reported as 0
        assert seen[0][2].stats["lstm/l0/forget/sat_right"] > 0.99
    assert_same_training(change)


def test_a_parameter_recreated_between_steps_is_measured_from_that_step():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs = batches(4)
    with lstmwatch.watch(model, log_every=1, sample=B, console=False) as w:
        for k, x in enumerate(xs):
            if k == 2:
                old = model.lstm.bias_ih_l0
                model.lstm.bias_ih_l0 = forget_bias(model.lstm)
                opt.param_groups[0]["params"] = [p if p is not old else model.lstm.bias_ih_l0
                                                 for p in opt.param_groups[0]["params"]]
            ref = lstmwatch.lstm_gates(model.lstm, x)[0]
            loss = model(x)
            loss.backward()
            g = model.lstm.bias_ih_l0.grad.norm().item()
            opt.step()
            opt.zero_grad()
            rec = w.step(loss)
            assert rec.stats["lstm/bias_ih_l0/grad_norm"] == pytest.approx(g, rel=1e-5)
            want = (ref.f > 0.9).float().mean().item()
            assert rec.stats["lstm/l0/forget/sat_right"] == pytest.approx(want, abs=1e-6)
        assert rec.stats["lstm/l0/forget/sat_right"] > 0.99


def test_a_module_replaced_after_watch_gets_a_note_once_and_no_false_warning():
    def change(model):
        model.lstm = nn.LSTM(F, H)  # the watched module no longer runs

    _, seen, w, caught = train(change, watched=True)
    notes = ours(caught, lstmwatch.LSTMWatchFailure)
    assert len(notes) == 1 and "lstm did not run" in notes[0] and "watch(" in notes[0], notes
    assert ours(caught) == notes  # no NoGradientWarning, nothing else
    assert not any(e.kind == "no_gradient" for e in w.events)
    assert all("lstm/grads_seen" not in rec.stats for _, _, rec in seen)
    assert_same_training(change)


def test_a_watched_module_that_runs_but_gets_no_gradient_still_warns():
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lstmwatch.watch(lstm, log_every=1, console=False) as w:
            for x in batches(4):
                lstm(x)[0].detach().sum()  # runs in a training forward, no backward through it
                w.step(1.0)
    assert any(e.kind == "no_gradient" for e in w.events)
    assert not ours(caught, lstmwatch.LSTMWatchFailure)


def _functional(lent):
    """A training loop on torch.func.functional_call: parameters lent to the module, updated by hand."""

    def run(watched: bool):
        torch.manual_seed(0)
        model = Net()
        params = {k: lent(v) for k, v in model.named_parameters()}
        w = lstmwatch.watch(model, log_every=1, console=False) if watched else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x in batches():
                loss = functional_call(model, params, (x,))
                loss.backward()
                with torch.no_grad():
                    for p in params.values():
                        p -= 0.05 * p.grad
                        p.grad = None
                if w is not None:
                    w.step(loss)
        if w is not None:
            w.close()
        return [p.detach().clone() for p in params.values()], w, caught

    return run


@pytest.mark.parametrize("lent", [lambda v: v.detach().clone().requires_grad_(),
                                  lambda v: nn.Parameter(v.detach().clone())], ids=["tensors", "parameters"])
def test_functional_call_gets_a_note_no_crash_no_false_warning(lent):
    run = _functional(lent)
    a, _, _ = run(False)
    b, w, caught = run(True)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "lstmwatch changed training"
    notes = ours(caught)
    assert len(notes) == 1 and "not its own" in notes[0] and "functional_call" in notes[0], notes
    assert not any(e.kind == "no_gradient" for e in w.events), [e.kind for e in w.events]
    assert len(w.records) == STEPS
    # The module's own parameters are hooked again after each step.
    model = w.probes[0].module
    assert all(p is model._parameters[n] for n, p in w.probes[0].params.items())


def test_the_module_own_parameters_are_measured_again_after_a_functional_call():
    torch.manual_seed(0)
    model = Net()
    x = batches(1)[0]
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_every=1, console=False) as w:
            functional_call(model, params, (x,)).backward()
            w.step(1.0)
            model(x).backward()
            g = model.lstm.weight_hh_l0.grad.norm().item()
            rec = w.step(1.0)
    assert len(ours(caught)) == 1
    assert rec.stats["lstm/weight_hh_l0/grad_norm"] == pytest.approx(g, rel=1e-5)
    assert rec.stats["lstm/grads_seen"] == 1.0
