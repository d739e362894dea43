"""nn.LSTMCell and nn.GRUCell stepped by hand: gates and gradient through time against autograd."""

import pytest
import torch
from torch import nn

import lstmwatch


class Unrolled(nn.Module):
    """A cell stepped over T by hand, loss on the last state."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell, self.head = cell, nn.Linear(cell.hidden_size, 1)
        self.hs: list[torch.Tensor] = []

    def forward(self, x):
        b, h = x.shape[0], self.cell.hidden_size
        state = (torch.zeros(b, h, dtype=x.dtype), torch.zeros(b, h, dtype=x.dtype))
        self.hs = []
        for t in range(x.shape[1]):
            if isinstance(self.cell, nn.LSTMCell):
                state = self.cell(x[:, t], state)
                out = state[0]
            else:
                state = (self.cell(x[:, t], state[0]),)
                out = state[0]
            out.retain_grad()
            self.hs.append(out)
        return self.head(out)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell])
def test_cell_gates_and_gradient_through_time(cell):
    torch.manual_seed(0)
    model = Unrolled(cell(3, 6)).double()
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    with lstmwatch.watch(model, log_every=1, sample=5, console=False) as w:
        loss = model(x).pow(2).mean()
        loss.backward()
        rec = w.step(loss)
    assert w.modules == ["cell"]
    ref = torch.stack([h.grad.norm() for h in model.hs]).tolist()  # dL/dh_t, total derivative
    assert rec.curves["cell/gtt"] == pytest.approx(ref, rel=1e-6)
    assert rec.stats["cell/gtt/ratio"] == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    # Gate statistics from the module's own hidden states: h is the cell's real output.
    hs = torch.stack([h.detach() for h in model.hs], 1)
    assert rec.stats["cell/l0/h/absmean"] == pytest.approx(hs.abs().mean().item(), rel=1e-6)
    assert rec.stats["cell/l0/h/sat"] == pytest.approx((hs.abs() > 0.9).double().mean().item())
    grads = dict(model.cell.named_parameters())
    assert rec.stats["cell/weight_hh/grad_norm"] == pytest.approx(grads["weight_hh"].grad.norm().item(), rel=1e-6)


def test_cell_training_is_untouched():
    def train(watched: bool):
        torch.manual_seed(1)
        model = Unrolled(nn.LSTMCell(3, 6))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        w = lstmwatch.watch(model, log_every=2, console=False) if watched else None
        for _ in range(6):
            x = torch.randn(4, 5, 3)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if w:
                w.step(loss)
        if w:
            w.close()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell])
def test_cell_gate_statistics_match_the_reference(cell):
    # The probe computes every call's gates at once with the production recurrence; here each call's gates are
    # written out by hand from the cell's weights, and the statistics computed by the test reference.
    from reference_probe import gru_stats, lstm_stats

    from lstmwatch.gates import GateTrace, GRUTrace

    torch.manual_seed(2)
    model = Unrolled(cell(3, 6)).double()
    x = 3 * torch.randn(5, 7, 3, dtype=torch.float64)
    w = {k: v.detach().clone() for k, v in model.cell.named_parameters()}
    with lstmwatch.watch(model, log_every=1, sample=5, console=False) as watcher:
        model(x).pow(2).mean().backward()
        rec = watcher.step(1.0)
    h = c = torch.zeros(5, 6, dtype=torch.float64)
    steps = []
    for t in range(x.shape[1]):
        zx = x[:, t] @ w["weight_ih"].T + w["bias_ih"]
        zh = h @ w["weight_hh"].T + w["bias_hh"]
        if cell is nn.LSTMCell:
            i, f, g, o = (zx + zh).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            steps.append((i, f, g, o, c, h))
        else:
            (xr, xz, xn), (hr, hz, hn) = zx.chunk(3, 1), zh.chunk(3, 1)
            r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
            n = (xn + r * hn).tanh()
            h = (1 - z) * n + z * h
            steps.append((r, z, n, h))
    cols = [torch.stack(s, 1) for s in zip(*steps)]  # each (B, T, H)
    mask = torch.ones(5, 7, dtype=torch.bool)
    trace = GateTrace(*cols, mask=mask, layer=0, direction=0) if cell is nn.LSTMCell else \
        GRUTrace(*cols, mask=mask, layer=0, direction=0)
    expected = lstm_stats(trace) if cell is nn.LSTMCell else gru_stats(trace)
    assert len(expected) == (16 if cell is nn.LSTMCell else 10)
    for (group, stat), v in expected.items():
        assert rec.stats[f"cell/l0/{group}/{stat}"] == pytest.approx(v.item(), rel=1e-9, abs=1e-12), (group, stat)


def test_a_nan_in_one_call_of_a_cell_is_dated_to_its_step():
    # The calls' inputs are summed over the step and checked once: a NaN in one timestep of step 7 (not a
    # logging step) is dated 7, and the steps before stay clean.
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 5)
    w = lstmwatch.watch(cell, log_every=5, console=False)
    for step in range(1, 11):
        h = c = torch.zeros(4, 5)
        loss = torch.zeros(())
        for t in range(6):
            x = torch.randn(4, 3)
            if step == 7 and t == 3:
                x[1, 2] = float("nan")
            h, c = cell(x, (h, c))
            loss = loss + h.pow(2).mean()
        loss.backward()
        rec = w.step(loss)
        if step == 5:
            assert "lstmcell/nonfinite/data" not in rec.stats
    assert rec.stats["lstmcell/nonfinite/data"] == 7
    w.close()
