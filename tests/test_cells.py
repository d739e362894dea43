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
