"""Train a small LSTM twice, healthy and with unnormalized inputs, and print what lstmwatch recorded."""

import torch
from torch import nn

import lstmwatch


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def run(scale: float, steps: int = 60) -> lstmwatch.Watcher:
    torch.manual_seed(0)
    model = Forecaster()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    watcher = lstmwatch.watch(model, log_every=20, console=False)
    for _ in range(steps):
        x = torch.randn(32, 20, 4)
        y = x[:, -3:, 0].mean(1, keepdim=True)
        loss = nn.functional.mse_loss(model(x * scale + scale), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        watcher.step(loss)
    watcher.close()
    return watcher


if __name__ == "__main__":
    for label, scale in (("healthy", 1.0), ("unnormalized inputs (x * 50 + 50)", 50.0)):
        r = run(scale).latest
        s = r.stats
        print(f"{label}: step {r.step} loss {r.loss:.4f}")
        print(f"  input |x| max {s['lstm/data/absmax']:.1f}, forget gate saturated "
              f"{s['lstm/l0/forget/sat_left'] + s['lstm/l0/forget/sat_right']:.0%}, "
              f"hidden |h|>0.9 {s['lstm/l0/h/sat']:.0%}, grad norm {s['grad_norm']:.2e}")
