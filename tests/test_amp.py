"""Mixed precision: gradients are judged unscaled, with the GradScaler passed or found in the training loop."""

import pytest
import torch
from torch import nn

import lstmwatch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _norms(pass_scaler: bool, use_scaler: bool) -> list[float]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=use_scaler)
    w = lstmwatch.watch(model, log_every=1, console=False, scaler=scaler if pass_scaler else None)
    norms = []
    for _ in range(4):
        x = torch.randn(4, 5, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_scaler):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        norms.append(w.step(loss).stats["grad_norm"])
    assert (w.clock.scaler is scaler) == use_scaler
    w.close()
    return norms


@pytest.mark.parametrize("pass_scaler", [True, False])
def test_grad_norms_are_unscaled(pass_scaler):
    scaled = _norms(pass_scaler, use_scaler=True)
    # The same run's gradients in bf16 autocast are within a few percent of the fp32 ones, not 65536x.
    plain = _norms(pass_scaler=False, use_scaler=False)
    for a, b in zip(scaled, plain):
        assert a == pytest.approx(b, rel=0.1)
