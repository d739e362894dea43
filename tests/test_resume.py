"""A run resumed from a checkpoint goes on where it stopped: same events as the run never interrupted."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lstmwatch


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, 3, generator=g) * 40 + 20  # unnormalized: raised at once, a latch to keep
    return x, torch.randn(16, 1, generator=g)


def train(model: Net, opt: torch.optim.Optimizer, watcher: lstmwatch.Watcher, steps: range) -> None:
    for s in steps:
        x, y = batch(s)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        watcher.step(loss)


def fresh() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=1e-4)


@pytest.mark.parametrize("restore", [True, False])
def test_resumed_run_raises_what_the_whole_run_raises(restore):
    model, opt = fresh()
    whole = lstmwatch.watch(model, log_every=10, console=False)
    train(model, opt, whole, range(1, 121))
    whole.close()

    model, opt = fresh()
    first = lstmwatch.watch(model, log_every=10, console=False)
    train(model, opt, first, range(1, 61))
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain values
    first.close()
    ckpt = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    model, opt = fresh()
    model.load_state_dict(ckpt[0])
    opt.load_state_dict(ckpt[1])
    second = lstmwatch.watch(model, log_every=10, console=False)
    if restore:
        second.load_state_dict(state)
    train(model, opt, second, range(61, 121))
    second.close()

    assert whole.events, "the run must raise something for the test to mean anything"
    same = list(second.events) == list(whole.events)
    assert same == restore  # without the state, the resumed run starts over and raises again
    if restore:
        assert second.step_count == 120
        assert [r.step for r in second.records] == [r.step for r in whole.records if r.step > 60]
        assert [r.stats for r in second.records] == [r.stats for r in whole.records if r.step > 60]


def test_state_of_other_detectors_is_refused():
    model, _ = fresh()
    w = lstmwatch.watch(model, console=False)
    state = w.state_dict()
    w.close()
    other = lstmwatch.watch(model, console=False, detectors={"padding": False})
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(state)
    other.close()
