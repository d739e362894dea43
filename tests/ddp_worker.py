"""One rank of a 2-process DDP job (gloo on 127.0.0.1), run by tests/test_distributed.py; writes what it saw.

Phases, each with its own model and watcher:
  equal: a healthy run whose logging step is checked against the two ranks' batches computed together;
  fault: rank 1's inputs alone are unnormalized (x 100); rank 0 must report it, naming rank 1, and rank 1 nothing;
  stop:  rank 1 stops calling watcher.step() (it keeps training); rank 0 must go on within rank_timeout.
  nan:   a NaN in rank 1's batch of step 7, whose all-reduced gradients make rank 0's NaN too: rank 0 must name
         rank 1's input batch at step 7, never its own gradients.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lstmwatch

B, T, F, H = 4, 6, 3, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(F, H, batch_first=True)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def batch(rank: int, step: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(B, T, F, generator=g) * scale, torch.randn(B, 1, generator=g)


def lstmwatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{type(w.message).__name__}: {w.message}" for w in caught
            if issubclass(w.category, lstmwatch.LSTMWatchWarning)]


def phase_equal(rank: int, out: Path) -> dict:
    torch.manual_seed(0)
    net = Net()
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    w = lstmwatch.watch(model, log_every=4, sample=B, console=False, log_dir=out / f"equal{rank}")
    got: dict = {"header_world": w.header.world_size}
    for step in range(1, 5):
        x, y = batch(rank, step)
        if step == 4:  # a logging step: the reference, from the weights this step runs with
            ref = copy.deepcopy(net)  # an unwatched twin (lstmwatch's hooks stay out of copies)
            xs = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(xs, x)
            union = torch.cat(xs)
            traces = lstmwatch.lstm_gates(ref.lstm, union)
            (tr,) = traces
            got["ref_input_mean"] = tr.i.mean().item()
            got["ref_forget_sat_right"] = (tr.f > 0.9).double().mean().item()
            got["ref_h_absmean"] = tr.h.abs().mean().item()
            # Each rank's gradient on its own batch, before DDP averages them: lstmwatch's gradient norm is
            # their root mean square over ranks.
            local = torch.autograd.grad((ref(x) - y).pow(2).mean(), list(ref.lstm.parameters()))
            norm = torch.sqrt(sum(g.pow(2).sum() for g in local)).reshape(1)
            norms = [torch.empty_like(norm) for _ in range(2)]
            dist.all_gather(norms, norm)
            got["ref_grad_norm_rms"] = math.sqrt(sum(n.item() ** 2 for n in norms) / 2)
            losses = [torch.empty(1) for _ in range(2)]
            dist.all_gather(losses, (ref(x) - y).pow(2).mean().detach().reshape(1))
            got["ref_loss_mean_over_ranks"] = sum(v.item() for v in losses) / 2
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = w.step(loss)
    w.close()
    got["stats"] = rec.stats
    got["log_files"] = sorted(p.name for p in (out / f"equal{rank}").glob("*")) if (out / f"equal{rank}").exists() \
        else []
    return got


def phase_fault(rank: int, out: Path, nan_at: int = 0) -> dict:
    torch.manual_seed(0)
    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = lstmwatch.watch(model, log_every=10)
        for step in range(1, 13):
            x, y = batch(rank, step, scale=100.0 if rank == 1 and not nan_at else 1.0)
            if rank == 1 and step == nan_at:
                x[0, 2, 1] = math.nan
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
        w.close()
    return {"warnings": lstmwatch_warnings(caught),
            "events": [{"kind": e.kind, "module": e.module, "message": e.message, "values": e.values}
                       for e in w.events],
            "diagnosis": [[f.kind, f.cause.values.get("rank"), [c.kind for c in f.consequences]]
                          for f in w.diagnose()],
            "records": [r.step for r in w.records]}


def phase_stop(rank: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = lstmwatch.watch(model, log_every=4, console=False, rank_timeout=2)
        for step in range(1, 21):
            x, y = batch(rank, step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 or step <= 6:
                w.step(loss)
        w.close()
    return {"warnings": [str(c.message) for c in caught], "steps": w.step_count,
            "records": [r.step for r in w.records]}


def phase_fsdp2(rank: int, out: Path) -> dict:
    # fully_shard turns the parameters into DTensor shards, whose gates and norms lstmwatch cannot compute:
    # refused at watch(), naming the module; the job trains on unwatched.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = Net()
    fully_shard(model, mesh=mesh)
    try:
        lstmwatch.watch(model, console=False)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    x, y = batch(rank, 1)
    (model(x) - y).pow(2).mean().backward()
    return {"refused": refused, "trained": all(p.grad is not None for p in model.parameters())}


def main() -> None:
    rank, out = int(os.environ["RANK"]), Path(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    result = {"rank": rank}
    phases = (("equal", phase_equal), ("fault", phase_fault), ("nan", functools.partial(phase_fault, nan_at=7)),
              ("stop", phase_stop), ("fsdp2", phase_fsdp2))
    for name, phase in phases:
        result[name] = phase(rank, out)
        dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
