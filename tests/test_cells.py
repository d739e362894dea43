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
@pytest.mark.parametrize("batch,sample", [(5, 5), (12, 4)])
def test_cell_gates_and_gradient_through_time(cell, batch: int, sample: int, monkeypatch):
    from lstmwatch.probes import cell as cell_probes

    windows: list[slice] = []  # the rows each logging step sampled: the reference reads the same ones
    draw = cell_probes.sample_window

    def recorded(b, clock):
        windows.append(draw(b, clock))
        return windows[-1]

    monkeypatch.setattr(cell_probes, "sample_window", recorded)
    torch.manual_seed(0)
    model = Unrolled(cell(3, 6)).double()
    x = torch.randn(batch, 7, 3, dtype=torch.float64)
    with lstmwatch.watch(model, log_every=1, sample=sample, console=False) as w:
        loss = model(x).pow(2).mean()
        loss.backward()
        rec = w.step(loss)
    assert w.modules == ["cell"]
    (rows,) = windows
    assert rows.stop - rows.start == sample
    ref = torch.stack([h.grad[rows].norm() for h in model.hs]).tolist()  # dL/dh_t, total derivative
    assert rec.curves["cell/gtt"] == pytest.approx(ref, rel=1e-6)
    assert rec.stats["cell/gtt/ratio"] == pytest.approx(ref[0] / ref[-1], rel=1e-6)
    # Gate statistics from the module's own hidden states: h is the cell's real output.
    hs = torch.stack([h.detach()[rows] for h in model.hs], 1)
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


@pytest.mark.parametrize("calls,bad_call,batches,views", [
    (6, 3, (4,), False),  # one reduction at the end of the step
    (300, 2, (4,), False),  # more calls than CellProbe.data_batch: the first inputs are reduced mid-step
    (300, 299, (4,), False),  # ... and the NaN is in the last, reduced at the end of the step
    (6, 5, (4, 3), False),  # inputs of different shapes: summed one by one
    (6, 3, (4,), True),  # x[:, t] of one tensor per step: that tensor summed once
    (300, 2, (4,), True),
])
def test_a_nan_in_one_call_of_a_cell_is_dated_to_its_step(calls: int, bad_call: int, batches: tuple[int, ...],
                                                          views: bool):
    # The calls' inputs are checked together: a NaN in one timestep of step 7 (not a logging step) is dated 7,
    # and the steps before stay clean.
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 5)
    w = lstmwatch.watch(cell, log_every=5, console=False)
    for step in range(1, 11):
        loss = torch.zeros(())
        state = {b: (torch.zeros(b, 5), torch.zeros(b, 5)) for b in batches}
        seq = torch.randn(batches[0], calls, 3)
        if step == 7:
            seq[1, bad_call, 2] = float("nan")
        for t in range(calls):
            b = batches[t % len(batches)]
            x = seq[:, t] if views else torch.randn(b, 3)
            if step == 7 and t == bad_call and not views:
                x[1, 2] = float("nan")
            h, c = state[b] = cell(x, state[b])
            loss = loss + h.pow(2).mean()
        loss.backward()
        rec = w.step(loss)
        if step == 5:
            assert "lstmcell/nonfinite/data" not in rec.stats
    assert rec.stats["lstmcell/nonfinite/data"] == 7
    w.close()


def test_a_nan_in_rows_of_the_dataset_no_batch_uses_is_not_the_inputs():
    # Batches sliced from one big tensor are views of it: that tensor is not summed in their place (it is far
    # larger than a step's inputs), so a NaN in rows never fed to the cell is not reported as one in the data.
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 5)
    data = torch.randn(400, 6, 3)
    data[-1, 2, 1] = float("nan")  # never in a batch
    w = lstmwatch.watch(cell, log_every=4, console=False)
    for step in range(8):
        batch = data[4 * step:4 * step + 4]
        h = c = torch.zeros(4, 5)
        for t in range(6):
            h, c = cell(batch[:, t], (h, c))
        h.pow(2).mean().backward()
        rec = w.step(1.0)
    w.close()
    assert rec is not None and rec.step == 8
    assert "lstmcell/nonfinite/data" not in rec.stats
