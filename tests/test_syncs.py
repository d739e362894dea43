"""lstmwatch never waits on the device outside logging steps, and a logging step makes one transfer.

A TorchFunctionMode sees every tensor call; a call counts when a frame of the lstmwatch package is on the
stack (the training code of these tests is not lstmwatch and is ignored). What waits on the device:
- device -> host reads: .item(), .tolist(), .numpy(), .cpu(), .to('cpu'), bool/float/int/index of a tensor
  (a Python branch on a tensor value is a bool), formatting a tensor;
- calls whose output shape depends on values (nonzero, masked_select, unique, x[bool_mask], ...);
- host -> device copies without non_blocking=True (PyTorch follows each with a stream synchronize on CUDA).
On a CPU-only machine every tensor is on the CPU, so the tests keep the device in the tensors' history instead:
a tensor is 'host' when lstmwatch made it with a factory given no device (torch.arange(n), torch.randperm(n),
torch.tensor(x), ...), or from host tensors only, or it is a PackedSequence's batch_sizes (always on the CPU);
every other tensor is on 'the device'. A torch.device object is taken to be the model's device; only .cpu()
and .to('cpu') name the host. Reading a host tensor waits on nothing and is not counted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.overrides import TorchFunctionMode

import lstmwatch
from lstmwatch import probes, stats
from lstmwatch.schedule import schedule

PKG = os.path.dirname(os.path.abspath(lstmwatch.__file__)) + os.sep
HOST = "_lstmwatch_test_host"  # attribute marking a host tensor

READS = {"item", "tolist", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__", "__complex__",
         "__format__", "__repr__", "__str__", "__contains__", "is_nonzero", "equal", "allclose"}
VALUE_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
FACTORIES = {"arange", "randperm", "randint", "full", "zeros", "ones", "empty", "tensor", "as_tensor", "linspace",
             "logspace", "eye", "rand", "randn", "scalar_tensor"}


@dataclass
class Sync:
    step: int
    kind: str  # 'd2h', 'h2d' or 'value-shaped'
    call: str
    site: str  # lstmwatch file:line that made the call

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind} {self.call} at {self.site}"


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, HOST, False)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _mark_host(obj) -> None:
    for t in _tensors(obj):
        setattr(t, HOST, True)


def _lstmwatch_site() -> str | None:
    """file:line of the innermost lstmwatch frame on the stack, or None."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.startswith(PKG):
            return f"{os.path.relpath(f.f_code.co_filename, PKG)}:{f.f_lineno}"
        f = f.f_back
    return None


def _bool_index(idx) -> bool:
    return any(t.dtype == torch.bool for t in _tensors(idx if isinstance(idx, tuple) else (idx,)))


class SyncCounter(TorchFunctionMode):
    """Counts lstmwatch's calls that wait on the device, each with the step in progress and its site."""

    def __init__(self, watcher: lstmwatch.Watcher | None = None):
        super().__init__()
        self.watcher = watcher
        self.syncs: list[Sync] = []
        self.host_reads = 0  # reads of host tensors: free, kept to show the classification works
        self.async_copies = 0  # non-blocking device -> host copies (the NaN/Inf flag of each step)

    def _step(self) -> int:
        return self.watcher.clock.step if self.watcher is not None else 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return self._backward(*args, **kwargs)
        out = func(*args, **kwargs)
        site = _lstmwatch_site()
        if site is None:
            return out
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        kind = None
        if name in READS:
            if _is_host(src) or not isinstance(src, torch.Tensor):
                self.host_reads += 1
            else:
                kind = "d2h"
        elif name in VALUE_SHAPED or (name == "where" and len(args) + len(kwargs) == 1) \
                or (name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1
                    and _bool_index(args[1])) \
                or (name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                    and "output_size" not in kwargs) \
                or (name == "one_hot" and kwargs.get("num_classes", args[1] if len(args) > 1 else -1) == -1):
            ins = list(_tensors(args)) + list(_tensors(kwargs))
            kind = None if all(_is_host(t) for t in ins) else "value-shaped"
        elif name == "cpu":
            kind = None if _is_host(src) else "d2h"
            out = self._moved(src, out, host=True)
            return self._add(kind, name, site, out)
        elif name == "to" and isinstance(src, torch.Tensor):
            raw = [a for a in args[1:] if isinstance(a, (str, torch.device))] + (
                [kwargs["device"]] if "device" in kwargs else [])
            non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
            if raw:
                to_host = isinstance(raw[0], str) and raw[0].startswith("cpu")
                if to_host:
                    kind = None if _is_host(src) else "d2h"
                    return self._add(kind, name, site, self._moved(src, out, host=True))
                if _is_host(src) and not non_blocking:
                    kind = "h2d"
                return self._add(kind, name, site, self._moved(src, out, host=False))
        elif name == "cuda":
            kind = "h2d" if _is_host(src) else None
            return self._add(kind, name, site, self._moved(src, out, host=False))
        elif name == "copy_" and len(args) > 1 and _is_host(args[0]) != _is_host(args[1]):
            kind = "d2h" if _is_host(args[0]) else "h2d"
            if kind == "d2h" and (kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True)):
                # Into pinned memory on CUDA, read only once its event has completed (tripwire.py): no wait.
                # test_cuda.py holds the real thing to set_sync_debug_mode("error").
                kind = None
                self.async_copies += 1
        elif name in ("tensor", "as_tensor") and "device" in kwargs:
            kind = "h2d"  # built on the host, then copied
        # Where the result lives.
        if name in FACTORIES and "device" not in kwargs:
            _mark_host(out)
        elif name == "_pad_packed_sequence":  # (padded on the data's device, lengths on the host)
            _mark_host(out[1])
        else:
            ins = list(_tensors(args)) + list(_tensors(kwargs))
            if ins and all(_is_host(t) for t in ins):
                _mark_host(out)
        return self._add(kind, name, site, out)

    @staticmethod
    def _moved(src, out, host: bool):
        """The result of a move: on the CPU .cpu() and .to() may return src itself, which must keep its place."""
        if out is src and _is_host(src) != host:
            out = src.clone()
            if not host:
                setattr(out, HOST, False)
        if host:
            _mark_host(out)
        return out

    def _backward(self, loss, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """loss.backward() with this mode on: PyTorch turns modes off inside a handler, and hooks run in backward."""
        assert inputs is None, "the tests call backward() without inputs"
        tensors = (loss,)
        grads = torch.autograd._make_grads(tensors, (gradient,), is_grads_batched=False)
        with self:
            torch.autograd.graph._engine_run_backward(tensors, grads, bool(retain_graph or create_graph), create_graph,
                                                      (), allow_unreachable=True, accumulate_grad=True)

    def _add(self, kind, name, site, out):
        if kind is not None:
            self.syncs.append(Sync(self._step(), kind, name, site))
        return out


# --- training runs


@dataclass
class Run:
    records: list[int] = field(default_factory=list)  # steps that returned a record
    expected: list[int] = field(default_factory=list)  # steps the schedule (or a val_loss) asks to log
    syncs: list[Sync] = field(default_factory=list)
    host_reads: int = 0
    steps: int = 0


class Head(nn.Module):
    """An RNN and a linear head on the final hidden state; takes a tensor or a PackedSequence."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        d = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(d * (getattr(rnn, "proj_size", 0) or rnn.hidden_size), 1)

    def forward(self, x, hx=None):
        out, state = self.rnn(x, hx)
        h = state[0] if isinstance(state, tuple) else state  # (L * D, B, H)
        d = 2 if self.rnn.bidirectional else 1
        out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
        # The output enters the loss too, so backward reaches lstmwatch's hooks on it.
        return self.head(torch.cat(list(h[-d:]), dim=1)) + out.mean()  # (B, 1)


class CellNet(nn.Module):
    """nn.LSTMCell stepped by hand over (B, T, F), a linear head on the last state."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x, hx=None):
        h = c = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def _batch(case: str, g: torch.Generator, b: int = 5, t: int = 6, f: int = 3):
    x = torch.randn(b, t, f, generator=g)
    y = torch.randn(b, 1, generator=g)
    if case == "packed":
        lengths = torch.tensor([6, 2, 5, 3, 6])
        x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        setattr(x.batch_sizes, HOST, True)  # a PackedSequence keeps batch_sizes on the CPU
    if case == "bidir_proj":
        x = x.transpose(0, 1)  # (T, B, F): batch_first=False
    return x, y


def _model(case: str) -> nn.Module:
    torch.manual_seed(0)
    if case == "bidir_proj":
        return Head(nn.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4))
    if case == "lstmcell":
        return CellNet()
    if case == "gru":
        return Head(nn.GRU(3, 8, num_layers=2, batch_first=True))
    return Head(nn.LSTM(3, 8, num_layers=2 if case != "plain" else 1, batch_first=True))


def train(case: str, steps: int = 10, log_every=4, inject=None) -> Run:
    """Train a small model `steps` optimizer steps under the counter; the training code syncs as users do."""
    model = _model(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=case == "gradscaler") if case.startswith("gradscaler") else None
    accumulate = 3 if case == "accumulate" else 1
    g = torch.Generator().manual_seed(1)
    sched = schedule(log_every)
    run = Run()
    with lstmwatch.watch(model, log_every=log_every, sample=3, console=False, scaler=scaler) as w:
        if inject is not None:
            inject(w)
        counter = SyncCounter(w)
        with counter:
            for s in range(1, steps + 1):
                for _ in range(accumulate):
                    x, y = _batch(case, g)
                    hx = None
                    if case == "bidir_proj":
                        hx = (torch.randn(4, 5, 4, generator=g), torch.randn(4, 5, 8, generator=g))
                    loss = nn.functional.mse_loss(model(x, hx), y) / accumulate
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
                val = None
                if case == "val_loss" and s % 3 == 0:
                    with torch.no_grad():  # an evaluation pass: the forward hook must return at once
                        xv, yv = _batch(case, g)
                        v = nn.functional.mse_loss(model(xv), yv)
                    val = v.item() if s % 2 else v  # a Python float, or a 0-d tensor
                loss.item()  # the user's own sync: not lstmwatch's, not counted
                rec = w.step(loss * accumulate, val_loss=val)
                if rec is not None:
                    run.records.append(s)
                if sched(s) or val is not None:
                    run.expected.append(s)
        run.syncs, run.host_reads, run.steps = counter.syncs, counter.host_reads, steps
    return run


pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

CASES = ["plain", "packed", "bidir_proj", "gradscaler_off", "gradscaler", "accumulate", "val_loss", "gru", "lstmcell"]
_RUNS: dict[str, Run] = {}


def _run(case: str) -> Run:
    if case not in _RUNS:
        _RUNS[case] = train(case)
    return _RUNS[case]


def _fmt(syncs) -> str:
    return "\n  ".join(str(s) for s in syncs) or "none"


@pytest.mark.parametrize("case", CASES)
def test_no_sync_outside_logging_steps(case):
    run = _run(case)
    bad = [s for s in run.syncs if s.step not in run.expected]
    assert not bad, f"lstmwatch waited on the device outside logging steps {run.expected}:\n  {_fmt(bad)}"


@pytest.mark.parametrize("case", CASES)
def test_one_transfer_per_logging_step(case):
    run = _run(case)
    assert run.records == run.expected, "a record must come exactly on the logging steps"
    for s in run.expected:
        got = [x for x in run.syncs if x.step == s and x.kind != "h2d"]
        assert [(x.call, x.site.split(":")[0]) for x in got] == [("tolist", "stats.py")], (
            f"step {s} must make one transfer, the .tolist() in stats.to_host; got:\n  {_fmt(got)}")


# On CUDA a blocking host-to-device copy is a stream synchronize: in a forward hook it stalls the host mid-forward.
@pytest.mark.parametrize("case", CASES)
def test_no_blocking_host_to_device_copy_on_logging_steps(case):
    run = _run(case)
    h2d = [x for x in run.syncs if x.kind == "h2d"]
    assert not h2d, f"blocking host-to-device copies:\n  {_fmt(h2d)}"


def test_schedule_default_dense_start_then_every_50():
    run = train("plain", steps=101, log_every=50)
    want = [1, 2, 4, 8, 16, 32, 50, 100]
    assert run.records == want
    assert sorted({x.step for x in run.syncs if x.kind == "d2h"}) == want


def test_schedule_callable():
    run = train("plain", steps=9, log_every=lambda s: s in (3, 7))
    assert run.records == [3, 7]
    assert [x.step for x in run.syncs if x.kind == "d2h"] == [3, 7]


def test_training_code_syncs_are_not_counted():
    # Every case's loop calls loss.item() each step, and GradScaler.step reads the device: none of it counts.
    with SyncCounter() as counter:
        t = torch.ones(3, requires_grad=True)
        (t * 2).sum().backward()
        t.grad.sum().item(), t.grad.tolist(), bool(t.grad.sum() > 0), t.grad.cpu()
    assert counter.syncs == []


# --- the counter catches what it must


def _as_lstmwatch(fn):
    """The function with its code filed under lstmwatch/probes/base.py, as if it were written there."""
    fn.__code__ = fn.__code__.replace(co_filename=probes.base.__file__)
    return fn


SYNC_CALLS = {
    "item": lambda t: t.sum().item(),
    "tolist": lambda t: t.tolist(),
    "branch": lambda t: 1 if t.sum() > 0 else 0,
    "float": lambda t: float(t.sum()),
    "int": lambda t: int(t.sum()),
    "cpu": lambda t: t.cpu(),
    "to_cpu": lambda t: t.to("cpu"),
    "numpy": lambda t: t.detach().numpy(),
    "nonzero": lambda t: t.nonzero(),
    "bool_mask": lambda t: t[t > 0],
    "h2d": lambda t: torch.arange(3).to(t.device),
}


def _wrap_hooks(kind: str, do, as_lstmwatch: bool = True):
    """An inject(watcher) that wraps the hooks lstmwatch registered so each first calls do(tensor)."""

    def inject(w):
        for probe in w.probes:
            if kind == "forward":
                table = [probe.module._forward_hooks]
            else:
                table = [p._post_accumulate_grad_hooks for p in probe.module.parameters()
                         if p._post_accumulate_grad_hooks]
            for hooks in table:
                for key, hook in list(hooks.items()):
                    def wrapped(*a, _hook=hook):
                        t = a[-1][0] if kind == "forward" else a[-1].grad  # the LSTM's output, or the gradient
                        do((t.data if isinstance(t, torch.nn.utils.rnn.PackedSequence) else t).detach())
                        return _hook(*a)

                    hooks[key] = _as_lstmwatch(wrapped) if as_lstmwatch else wrapped
        return w

    return inject


@pytest.mark.parametrize("kind", ["grad", "forward"])
@pytest.mark.parametrize("call", list(SYNC_CALLS))
def test_counter_catches_a_sync_in_a_probe_hook(kind, call):
    run = train("plain", steps=6, log_every=4, inject=_wrap_hooks(kind, _as_lstmwatch(SYNC_CALLS[call])))
    outside = [x for x in run.syncs if x.step not in run.expected]
    assert {x.step for x in outside} == {3, 5, 6}, _fmt(run.syncs)
    assert all(x.site.startswith(os.path.join("probes", "base.py")) for x in outside)
    _RUNS["_patched"] = run
    try:
        with pytest.raises(AssertionError, match="outside logging steps"):
            test_no_sync_outside_logging_steps("_patched")
    finally:
        _RUNS.pop("_patched", None)


def test_counter_catches_a_second_transfer_on_a_logging_step(monkeypatch):
    orig = stats.to_host

    def twice(items):
        for v in items.values():  # one read per statistic: what the single transfer replaces
            v.detach().reshape(-1)[0].item()
            break
        return orig(items)

    monkeypatch.setattr(stats, "to_host", _as_lstmwatch(twice))
    run = train("plain", steps=4, log_every=4)
    _RUNS["_patched"] = run
    try:
        with pytest.raises(AssertionError, match="must make one transfer"):
            test_one_transfer_per_logging_step("_patched")
    finally:
        _RUNS.pop("_patched", None)


def test_counter_ignores_syncs_of_a_test_helper():
    # The same .item() in a wrapper that is not lstmwatch's code (not filed under its package) is not counted.
    run = train("plain", steps=3, log_every=4, inject=_wrap_hooks("grad", lambda t: t.sum().item(), False))
    assert not [x for x in run.syncs if x.step == 3]
