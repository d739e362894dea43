"""A Lightning fit under strategy="ddp" on 2 CPU processes, with lstmwatch's callback: run by
tests/test_lightning.py as a script (Lightning's launcher starts rank 1 by running it again); rank 1's inputs
alone are unnormalized. Each rank writes what it saw to <out>/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lstmwatch
from lstmwatch.lightning import LSTMWatch, pl


class Data(Dataset):
    """Rank 1's sequences are scaled by 100 (read from the launcher's environment, before the fit starts)."""

    def __init__(self, rank: int):
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(64, 6, 3, generator=g) * (100.0 if rank == 1 else 1.0)
        self.y = torch.randn(64, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.head(self.lstm(x)[0][:, -1]) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.01)

    def train_dataloader(self):
        # No DistributedSampler: each rank keeps its own data, so the fault stays on rank 1.
        return DataLoader(Data(self.global_rank), batch_size=8)


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    cb = LSTMWatch(log_every=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, default_root_dir=str(out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net())
    w = cb.watcher
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": w.header.world_size, "steps": w.step_count,
        "warnings": [str(c.message) for c in caught if issubclass(c.category, lstmwatch.LSTMWatchWarning)],
        "events": [{"kind": e.kind, "message": e.message} for e in w.events],
        "pid": os.getpid()}))


if __name__ == "__main__":
    main()
