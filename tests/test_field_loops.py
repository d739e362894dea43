"""Training loops and wrappers other people write: gradients handed over by hand, weights frozen at watch() and
unfrozen later, weights set by a wrapper before each call, a validation pass with gradients on before training,
and a forward called past the module's hooks. Each is measured as a plain loop would be, or said."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lstmwatch


class Net(nn.Module):
    def __init__(self, lstm: nn.Module | None = None):
        super().__init__()
        self.lstm = lstm if lstm is not None else nn.LSTM(3, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out = self.lstm(x)
        return self.head((out[0] if isinstance(out, tuple) else out)[:, -1])


def _batch(g: torch.Generator, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 12, 3, generator=g) + shift
    return x, x[:, :, :1].mean(1)


def _fit(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, steps: int):
    """A plain loop, watched every step; the last record."""
    rec = None
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(steps):
            x, y = _batch(g)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec = w.step(loss)
    return rec


def _lstm_norm(m: nn.Module) -> float:
    return torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]).norm().item()


def test_gradients_handed_to_the_optimizer_by_hand_are_measured():
    # torch.autograd.grad, then `p.grad = g` (PCGrad, meta-learning, custom trainers): no gradient hook runs.
    torch.manual_seed(0)
    model, g = Net(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    params = list(model.parameters())
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(6):
            x, y = _batch(g)
            loss = F.mse_loss(model(x), y)
            for p, grad in zip(params, torch.autograd.grad(loss, params)):
                p.grad = grad
            real = _lstm_norm(model.lstm)
            opt.step()
            opt.zero_grad()  # before watcher.step(): the optimizer's step is where they are read
            rec = w.step(loss)
            assert rec.stats["lstm/grad_norm"] == pytest.approx(real, rel=1e-5)
    assert not [e for e in w.events if e.kind == "no_gradient"]


def test_an_lstm_frozen_at_watch_and_unfrozen_later_is_measured_once_it_trains():
    torch.manual_seed(0)
    model, g = Net(), torch.Generator().manual_seed(1)
    model.lstm.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for step in range(1, 7):
            if step == 4:
                model.lstm.requires_grad_(True)  # fine-tuning: the encoder joins after a few steps
            x, y = _batch(g)
            F.mse_loss(model(x), y).backward()
            real = _lstm_norm(model.lstm) if step >= 4 else 0.0
            opt.step()
            rec = w.step()
            opt.zero_grad()
            assert rec.stats["lstm/grad_norm"] == pytest.approx(real, rel=1e-5)
            if step >= 4:
                assert rec.stats["lstm/trainable"] == 1.0 and rec.stats["lstm/grads_seen"] == 1.0


class DropConnect(nn.Module):
    """Weight dropout on the recurrent weights, set on the LSTM as a plain tensor before each call (the way
    fastai's WeightDropout wraps an LSTM): the LSTM's forward reads a weight that is not its parameter."""

    def __init__(self, lstm: nn.LSTM, p: float = 0.5):
        super().__init__()
        self.module, self.p = lstm, p
        raw = lstm.weight_hh_l0
        del lstm._parameters["weight_hh_l0"]
        self.weight_hh_l0_raw = nn.Parameter(raw.detach().clone())
        lstm.weight_hh_l0 = raw.detach().clone()

    def forward(self, x):
        self.module.weight_hh_l0 = F.dropout(self.weight_hh_l0_raw, self.p, self.training)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # weights not in one buffer
            return self.module(x)


def test_weights_set_by_a_wrapper_before_each_call_are_read_as_the_forward_read_them():
    torch.manual_seed(0)
    model, g = Net(DropConnect(nn.LSTM(3, 16, batch_first=True))), torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lstmwatch.LSTMWatchFailure)  # no step may fail
        rec = _fit(model, opt, g, 3)
    name = "lstm.module"
    for key in ("l0/forget/sat_right", "l0/cell/sat", "data/std", "gtt/ratio", "weight_ih_l0/grad_norm"):
        assert f"{name}/{key}" in rec.stats, key
    # The gates of the dropped weights, recomputed, reproduce the module's own output: its hidden states.
    inner = model.lstm.module
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        h_ref = inner(x)[0]
        gates = lstmwatch.lstm_gates(inner, x)
    assert torch.allclose(gates[-1].h, h_ref, atol=1e-6)


def test_a_validation_pass_with_gradients_on_before_training_is_not_what_is_measured():
    torch.manual_seed(0)
    model, g = Net(), torch.Generator().manual_seed(3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    with lstmwatch.watch(model, console=False) as w:
        xv, _ = _batch(g, shift=5.0)  # a validation batch nothing like the training batches
        model.eval()
        model(xv)  # no torch.no_grad(): autograd records it, nothing calls backward
        model.train()
        x, y = _batch(g)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        rec = w.step(loss)
    assert abs(rec.stats["lstm/data/mean"]) < 1.0  # the training batch's (about 0), not the validation's (5)
    assert rec.curves.get("lstm/gtt") and rec.stats.get("lstm/gtt/ratio") is not None


class CallsForward(nn.Module):
    """A wrapper that calls the LSTM's forward method itself, as AWD-LSTM's WeightDrop does: no module hook runs."""

    def __init__(self):
        super().__init__()
        self.module = nn.LSTM(3, 16, batch_first=True)

    def forward(self, x):
        return self.module.forward(x)


def test_a_forward_called_past_the_hooks_is_said():
    torch.manual_seed(0)
    model, g = Net(CallsForward()), torch.Generator().manual_seed(4)
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    with pytest.warns(lstmwatch.LSTMWatchFailure, match=r"calls its `\.forward\(\.\.\.\)` directly"):
        _fit(model, opt, g, 4)


def test_a_compiled_graph_traced_before_watch_is_said():
    # A notebook: the compiled model ran before watch(); its graph, reused, runs the cell without the hooks.
    pytest.importorskip("torch._dynamo")

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.LSTMCell(3, 8), nn.Linear(8, 1)

        def forward(self, x):
            h = c = x.new_zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return self.head(h)

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Loop()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), 1e-2)

    def step():
        loss = compiled(torch.randn(4, 5, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step()
    try:
        with pytest.warns(lstmwatch.LSTMWatchFailure, match="torch.compile graph traced before watch"):
            with lstmwatch.watch(model, log_every=1, console=False) as w:
                for _ in range(4):
                    w.step(step())
    finally:
        torch._dynamo.reset()


class CellLoop(nn.Module):
    """An nn.LSTMCell stepped over the first `feats` columns of x (B, T, F), a linear head on the last h."""

    def __init__(self, feats: int = 3, cell: nn.Module | None = None, checkpoint: bool | None = None):
        super().__init__()
        self.feats, self.checkpoint = feats, checkpoint
        self.cell = cell if cell is not None else nn.LSTMCell(feats, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = c = x.new_zeros(x.shape[0], 8)
        if self.checkpoint:
            h = c = h.requires_grad_()  # a reentrant checkpoint keeps a graph only for inputs that require grad
        for t in range(x.shape[1]):
            xt = x[:, t, :self.feats]
            if self.checkpoint is None:
                h, c = self.cell(xt, (h, c))
            else:  # the states as tensors of their own: a reentrant checkpoint does not look inside a tuple
                h, c = checkpoint(lambda a, b, s: self.cell(a, (b, s)), xt, h, c, use_reentrant=self.checkpoint)
        return self.head(h)


def _cell_run(model: nn.Module, x: torch.Tensor, steps: int = 3):
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(steps):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    return w


def test_a_nan_where_the_cell_never_reads_is_not_the_cells():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 4)
    x[:, :, 3] = float("nan")  # a column the loop leaves out (the cell reads x[:, t, :3])
    w = _cell_run(CellLoop(3), x)
    assert not [e for e in w.events if e.kind == "nonfinite"]
    x[1, 2, 0] = float("nan")  # one the cell does read: named at once
    w = _cell_run(CellLoop(3), x)
    assert [e.step for e in w.events if e.kind == "nonfinite"][:1] == [1]


def test_a_reentrant_checkpoint_leaves_a_cells_gradient_through_time_out_and_says_so():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3)
    w = _cell_run(CellLoop(3, checkpoint=False), x)  # non-reentrant: the calls run in order, kept
    assert w.records[-1].curves.get("cell/gtt")
    with pytest.warns(lstmwatch.LSTMWatchFailure, match="use_reentrant"):
        w = _cell_run(CellLoop(3, checkpoint=True), x)
    assert "cell/gtt" not in w.records[-1].curves and "cell/l0/forget/mean" in w.records[-1].stats


class LayerNormCell(nn.LSTMCell):
    """An LSTMCell subclass computing a layer-normalized cell of its own: not nn.LSTMCell's equations."""

    def __init__(self, inp: int, hidden: int):
        super().__init__(inp, hidden)
        self.ln = nn.LayerNorm(4 * hidden)

    def forward(self, x, hx=None):
        h, c = hx
        z = self.ln(F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh))
        i, f, g, o = z.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def test_a_cell_subclass_with_its_own_forward_has_no_made_up_gates():
    torch.manual_seed(0)
    with pytest.warns(lstmwatch.LSTMWatchFailure, match="forward of its own"):
        w = _cell_run(CellLoop(3, cell=LayerNormCell(3, 8)), torch.randn(4, 6, 3))
    stats = w.records[-1].stats
    assert not [k for k in stats if k.startswith("cell/l0/") and k.endswith(("/mean", "/sat_right"))]
    assert stats["cell/grad_norm"] > 0 and w.records[-1].curves.get("cell/gtt")



def test_a_failure_in_the_optimizer_step_hook_never_reaches_the_optimizer(monkeypatch):
    # The optimizer step pre-hook runs inside the user's optimizer.step(): whatever fails there is said, not raised.
    from lstmwatch.watch import Watcher

    monkeypatch.setattr(Watcher, "_grads_before_step", lambda self, opt: 1 / 0)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    with pytest.warns(lstmwatch.LSTMWatchFailure, match="optimizer step failed.*ZeroDivisionError"):
        with lstmwatch.watch(model, log_every=1, console=False) as w:
            loss = F.mse_loss(model(torch.randn(4, 5, 3)), torch.randn(4, 1))
            loss.backward()
            opt.step()  # the hook fails inside it; the step is taken
            w.step(loss)
    assert model.lstm.weight_hh_l0.grad is not None
