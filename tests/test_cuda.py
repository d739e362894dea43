"""On a CUDA device: gates against cuDNN's LSTM, no stream sync outside logging steps, statistics on the device.

Every test here skips on a machine without CUDA; test_syncs.py makes the same sync check on the CPU by
following each tensor's device through lstmwatch's calls.
"""

from __future__ import annotations

import pytest
import torch
from test_fast import _assert_same, _record
from test_gates import CONFIGS, build, run_module
from torch import nn

import lstmwatch
from lstmwatch import stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDNN_CONFIGS = {k: c for k, c in CONFIGS.items() if not c.autocast}


@pytest.fixture(autouse=True)
def _exact_float32(monkeypatch):
    # TF32 rounds matmul inputs to 10 bits: float32 tolerances need it off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("cfg", CUDNN_CONFIGS.values(), ids=CUDNN_CONFIGS.keys())
def test_lstm_gates_reproduce_cudnn(cfg):
    lstm, inp, _, lengths, hx = build(cfg, torch.float32)
    lstm = lstm.cuda()
    inp = inp.to("cuda")
    hx = tuple(s.cuda() for s in hx) if hx is not None else None
    with torch.no_grad():
        out, hn, cn = run_module(cfg, lstm, inp, hx)  # cuDNN's kernel
        traces = lstmwatch.lstm_gates(lstm, inp, hx)
    assert traces[0].h.is_cuda
    got = torch.cat([tr.h for tr in traces[-cfg.d:]], dim=2)
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)
    for idx, tr in enumerate(traces):
        for r, n in enumerate(lengths):
            t = 0 if tr.direction == 1 else n - 1
            torch.testing.assert_close(tr.h[r, t], hn[idx, r], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(tr.c[r, t], cn[idx, r], rtol=1e-4, atol=1e-5)


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True, **kw)
        self.head = nn.Linear(32 * (2 if kw.get("bidirectional") else 1), 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _train(model, steps: int, watcher=None, check=None):
    """A short cuDNN training run; check(logging) gives the sync debug mode for each step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(16, 20, 8, device="cuda", generator=g)
    y = torch.randn(16, 1, device="cuda", generator=g)
    for _ in range(steps):
        logging = watcher is not None and watcher.clock.logging
        torch.cuda.set_sync_debug_mode(check(logging) if check else "default")
        try:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            if watcher is not None:
                watcher.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"bidirectional": True}], ids=["base", "layers2", "bidir"])
def test_no_stream_sync_outside_logging_steps(kw):
    torch.manual_seed(0)
    model = Net(**kw).cuda()
    try:  # the training loop alone must not sync, or the check below would say nothing of lstmwatch
        _train(Net(**kw).cuda(), 2, check=lambda logging: "error")
    except RuntimeError as e:
        pytest.skip(f"this PyTorch's training step itself syncs: {e}")
    with lstmwatch.watch(model, log_every=5, console=False) as w:
        # steps 1, 2, 4 and 5 log (the dense start, then every 5th); the others must not wait on the device
        _train(model, 12, watcher=w, check=lambda logging: "default" if logging else "error")
        assert [r.step for r in w.records] == [1, 2, 4, 5, 10]
        assert all(r.stats["lstm/grad_norm"] > 0 for r in w.records)


def test_a_nan_is_reported_by_the_next_step_without_a_sync():
    # The step's NaN/Inf flag goes to pinned memory behind an event and is read once the event has completed:
    # a record comes at the NaN's step (10) or the one after, not at the next logging step (16), and no step
    # before it waits on the device.
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 20, 8, device="cuda")
    y = torch.randn(16, 1, device="cuda")
    with lstmwatch.watch(model, log_every=50, console=False) as w:
        for step in range(1, 13):
            quiet = not w.clock.logging and step <= 10
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")
            try:
                xb = x.clone()
                if step == 10:
                    xb[0, 3, 1] = float("nan")
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(xb), y)
                loss.backward()
                opt.step()
                w.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if step == 10:
                torch.cuda.synchronize()  # the flag's copy is done: step 11 reads it without waiting
        (e,) = [e for e in w.events if e.kind == "nonfinite"]
        assert e.step in (10, 11) and "input batch" in e.message and "at step 10" in e.message
        assert [r.step for r in w.records] == [1, 2, 4, 8, e.step]


def test_statistics_stay_on_the_module_device(monkeypatch):
    seen = []
    to_host = stats.to_host
    monkeypatch.setattr(stats, "to_host", lambda items: seen.append({t.device.type for t in items.values()})
                        or to_host(items))
    model = Net(num_layers=2).cuda()
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        _train(model, 3, watcher=w)
        rec = w.latest
    assert seen and all(devs == {"cuda"} for devs in seen)
    assert "lstm/gtt" in rec.curves and rec.stats["lstm/l1/forget/mean"] > 0


@pytest.mark.parametrize("kw", [{"num_layers": 2}, {"num_layers": 2, "proj_size": 3}], ids=["layers2", "proj"])
def test_production_path_equals_reference_on_cudnn(kw, monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, **kw).cuda()
    x = torch.randn(9, 6, 5, device="cuda")
    _assert_same(_record(lstm, x, None, "last_step", False, monkeypatch),
                 _record(lstm, x, None, "last_step", True, monkeypatch))
