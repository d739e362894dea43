"""Classes of failure met in training programs written elsewhere, each reproduced on a small model of its own.

A float64 model whose loss grows past float32's range stays finite to lstmwatch, and its divergence is named
as the cause of what it does to the gates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import lstmwatch


class Forecaster(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def test_a_float64_loss_past_float32s_range_is_finite_and_its_divergence_is_the_cause():
    torch.manual_seed(0)
    model = Forecaster().double()
    t = torch.arange(40, dtype=torch.float64)
    x = torch.sin(t / 5)[None, :, None].repeat(8, 1, 1) + 0.1 * torch.randn(8, 40, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # far too high: the head's weights blow up
    with lstmwatch.watch(model, console=False) as w:
        for _ in range(40):
            loss = (model(x[:, :-1]) - x[:, 1:]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
    losses = [r.loss for r in w.records]
    assert max(losses) > 1e47 and all(math.isfinite(v) for v in losses)  # past float32's 3.4e38
    assert "nonfinite" not in {e.kind for e in w.events}
    assert all("nonfinite_loss" not in r.stats for r in w.records)
    root = w.diagnose()[0]
    assert root.kind in ("exploding_gradient", "diverging_loss"), w.summary()
    assert {e.kind for e in w.events} - {root.kind} <= {c.kind for c in root.consequences}
