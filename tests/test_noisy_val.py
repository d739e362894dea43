"""Overfitting against noisy validation losses: a model trained on fresh batches cannot overfit, however its
validation loss on a small fixed set wanders; a model that memorizes a tiny training set still does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lstmwatch
from lstmwatch.detectors import Overfitting


class _Classifier(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose class is the sign of a noisy sum: label noise, so the loss has a floor above 0."""
    x = torch.randn(n, 12, 4, generator=gen)
    y = (x[:, :, 0].sum(1) + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return x, y


def _run(seed: int, steps: int, *, val_size: int, train_size: int | None = None, hidden: int = 16,
         val_every: int = 25) -> lstmwatch.Watcher:
    """Adam 3e-3 on batches of 16: fresh ones every step (train_size None), or drawn from a fixed training set;
    the validation loss on one fixed held-out set every `val_every` steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _Classifier(hidden)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xv, yv = _batch(val_size, gen)
    train = _batch(train_size, gen) if train_size else None
    with lstmwatch.watch(model, console=False) as w:
        for step in range(1, steps + 1):
            if train is None:
                x, y = _batch(16, gen)
            else:
                idx = torch.randint(0, len(train[1]), (16,), generator=gen)
                x, y = train[0][idx], train[1][idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            val = None
            if step % val_every == 0:
                model.eval()
                with torch.no_grad():
                    val = F.cross_entropy(model(xv), yv).item()
                model.train()
            w.step(loss, val_loss=val)
    return w


def _overfitting(w: lstmwatch.Watcher) -> list[tuple[int, str]]:
    return [(e.step, e.message) for e in w.events if e.kind == "overfitting"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fresh_batches_with_a_small_noisy_validation_set_raise_no_overfitting(seed):
    # Every training batch is new: the model cannot memorize. Its loss on 16 fixed validation samples still
    # wanders well above its luckiest evaluation, for several evaluations at a time.
    w = _run(seed, 600, val_size=16)
    assert len([r for r in w.records if r.val_loss is not None]) == 24
    assert _overfitting(w) == []


def test_a_memorized_training_set_is_flagged_while_the_validation_loss_climbs():
    # 64 training sequences, a model large enough to learn them by heart: the held-out loss turns up for good.
    w = _run(0, 300, val_size=256, train_size=64, hidden=64)
    found = _overfitting(w)
    assert found, "a memorized training set must be flagged"
    step, message = found[0]
    vals = [(r.step, r.val_loss) for r in w.records if r.val_loss is not None]
    best_step = min(vals, key=lambda sv: sv[1])[0]
    assert step <= best_step + 5 * 25  # within a few evaluations of the turn
    assert "validation loss has not improved" in message and "memorizes the training set" in message


def test_a_state_saved_before_the_spread_was_kept_still_loads():
    w = _run(0, 300, val_size=256, train_size=64, hidden=64)
    records = list(w.records)
    half = Overfitting()
    for r in records[: len(records) // 2]:
        half.update(r)
    old = {k: v for k, v in half.state_dict().items() if k not in ("train_steps_at_best", "previous", "bends")}
    resumed = Overfitting()
    resumed.load_state_dict(old)
    events = [e for r in records[len(records) // 2 :] for e in resumed.update(r)]
    assert resumed.bends[2] > 0  # the spread is learned from the evaluations after the resume
    assert all(e.kind == "overfitting" for e in events)
