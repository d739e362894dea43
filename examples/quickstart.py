"""A forecaster fed raw, unnormalized values: lstmwatch says so at the first step, and how to fix it."""

import torch
from torch import nn

import lstmwatch

torch.manual_seed(0)
lstm, head = nn.LSTM(1, 32, batch_first=True), nn.Linear(32, 1)
model = nn.ModuleDict({"lstm": lstm, "head": head})
opt = torch.optim.Adam(model.parameters(), lr=3e-3)

with lstmwatch.watch(model) as watcher:
    for _ in range(100):
        prices = 1000 + 300 * torch.sin(torch.rand(32, 1) * 6 + torch.arange(31) * 0.2)  # (B, T + 1), raw scale
        x, y = prices[:, :-1, None], prices[:, -1:]
        loss = nn.functional.mse_loss(head(lstm(x)[0][:, -1]), (y - 1000) / 300)
        loss.backward()
        opt.step()
        opt.zero_grad()
        watcher.step(loss)
