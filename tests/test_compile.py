"""torch.compile: a watched compiled model trains bit for bit as the unwatched one, and lstmwatch adds no graph,
no graph break, no frame and no recompilation to what Dynamo does with it (torch._dynamo's own counters).

Dynamo does not trace nn.LSTM / nn.GRU: their call, hooks included, runs eagerly in the middle of a compiled
model, and lstmwatch's hooks are kept out of Dynamo there (probes/hooks.py, `eager_only`). Traced, they read the
clock, whose step and logging flag change between steps, and Dynamo guarded on them and recompiled; they also
broke graphs and made new ones of lstmwatch's own code. Each case runs 10 steps at log_every=4: logging steps 1,
2, 4, 8 and the steps between, so the logging flag flips both ways several times.

Any forward hook on a torch.nn module, even a builtin that does nothing, makes Dynamo attempt that module's
forward as a frame of its own (trace_rules: "inbuilt nn.Module.forward allowed - module has hooks"); for nn.LSTM
the attempt gives up (Dynamo does not trace RNNs), once per class: one frame, no graph. Counts are therefore
compared with the same model holding such an inert hook, and graphs, graph breaks and recompilations with the
plain model as well.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from field_models import assert_params_equal
from torch import Tensor, nn
from torch._dynamo import convert_frame
from torch._dynamo.utils import counters

import lstmwatch

STEPS, LOG_EVERY = 10, 4
LOGGED = [1, 2, 4, 8]
INERT = functools.partial(object.__init__, ())  # a forward hook that does nothing, without a Python frame


class Net(nn.Module):
    """A linear layer, the recurrent part, a linear head on the last step: (B, T, 3) -> (B, 1)."""

    def __init__(self, rnn: str = "lstm"):
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.rnn = {"lstm": lambda: nn.LSTM(3, 8, batch_first=True), "sub": lambda: OutputOnly(3, 8, batch_first=True),
                    "cell": lambda: nn.LSTMCell(3, 8)}[rnn]()
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.pre(x))
        if isinstance(self.rnn, nn.LSTMCell):
            hc = None
            for t in range(x.shape[1]):
                hc = self.rnn(x[:, t], hc)
            last = hc[0]
        elif isinstance(self.rnn, OutputOnly):
            last = self.rnn(x)[:, -1]
        else:
            last = self.rnn(x)[0][:, -1]
        return self.head(last)


class OutputOnly(nn.LSTM):
    """A subclass with a forward of its own: lstmwatch watches its inner nn.LSTM.forward call (hooks.py)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def _compile_whole(model: nn.Module, backend: str) -> nn.Module:
    return torch.compile(model, backend=backend)


def _compile_rnn(model: nn.Module, backend: str) -> nn.Module:
    model.rnn = torch.compile(model.rnn, backend=backend)
    return model


def dynamo_counts() -> dict[str, int]:
    """What Dynamo did since the last reset: graphs made, graph breaks, frames it tried, recompilations."""
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "frames": counters["frames"]["total"], "frames_ok": counters["frames"]["ok"],
            "unsupported": sum(counters["unimplemented"].values()),
            "recompiles": sum(n - 1 for n in convert_frame.FRAME_COMPILE_COUNTER.values())}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(rnn: str, compile_: Callable[[nn.Module, str], nn.Module] | None, *, backend: str = "aot_eager",
        watch: str | None = None, inert_hook: bool = False,
        compiled_step: bool = False) -> tuple[nn.Module, dict[str, int], list[Any], list[str]]:
    """Train Net(rnn) for STEPS SGD steps from one seed, compiled by `compile_` with `backend` (None: eager),
    watched 'before' or 'after' compiling (None: not watched). compiled_step: forward and backward inside a
    compiled function. Returns the model, Dynamo's counts, the records and the LSTMWatchFailure messages.

    Dynamo's part (frames, guards, graphs, graph breaks) is the same whatever the backend; aot_eager, which
    still splits forward and backward through AOTAutograd, saves Inductor's code generation (seconds a graph
    on a cold cache), and one case keeps Inductor, torch.compile's default."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net(rnn)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(STEPS)]
    if inert_hook:
        model.rnn.register_forward_hook(INERT)
    w = lstmwatch.watch(model, log_every=LOG_EVERY, console=False) if watch == "before" else None
    net = compile_(model, backend) if compile_ is not None else model
    if watch == "after":
        w = lstmwatch.watch(net, log_every=LOG_EVERY, console=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def fwd_bwd(x: Tensor, y: Tensor) -> Tensor:
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        return loss

    step = torch.compile(fwd_bwd, backend=backend) if compiled_step else fwd_bwd
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data:
            loss = step(x, y)
            opt.step()
            opt.zero_grad()
            if w is not None:
                w.step(loss)
        if w is not None:
            w.close()
    notes = [str(c.message) for c in caught if issubclass(c.category, lstmwatch.LSTMWatchFailure)]
    return model, dynamo_counts(), list(w.records) if w is not None else [], notes


def shape(records: list[Any]) -> list[tuple[int, list[str]]]:
    """Each record's step and statistic keys, the module's name left out (a compiled submodule is 'rnn._orig_mod')."""
    return [(r.step, sorted(k.split("/", 1)[1] if k.startswith("rnn") else k for k in r.stats)) for r in records]


CASES = {
    "whole": dict(rnn="lstm", compile_=_compile_whole, backend="inductor"),
    "lstm-only": dict(rnn="lstm", compile_=_compile_rnn),
    "subclass": dict(rnn="sub", compile_=_compile_whole),
    "compiled-step": dict(rnn="lstm", compile_=_compile_whole, compiled_step=True),
}


@pytest.mark.parametrize("watch", ["after", "before"])
@pytest.mark.parametrize("case", list(CASES))
def test_watched_compiled_model_trains_and_compiles_as_unwatched(case, watch):
    kw = CASES[case]
    plain, plain_counts, _, _ = run(**kw)
    _, hooked_counts, _, _ = run(**kw, inert_hook=True)
    model, counts, records, notes = run(**kw, watch=watch)
    assert_params_equal(plain, model)
    assert counts == hooked_counts, f"lstmwatch changed what Dynamo did: {counts} vs {hooked_counts} (inert hook)"
    for k in ("graphs", "graph_breaks", "recompiles"):
        assert counts[k] == plain_counts[k], (k, counts, plain_counts)
    assert counts["recompiles"] == 0
    # Everything eager shows is recorded: gates, gradient norms, gradient through time, update ratio, NaN watch.
    _, _, eager, _ = run(kw["rnn"], None, watch="after")
    assert [r.step for r in records] == LOGGED
    assert shape(records) == shape(eager)
    assert any("/forget/sat_right" in k for k in records[-1].stats)
    assert not notes


@pytest.mark.parametrize("rnn", ["lstm", "sub"])
def test_lstmwatch_code_is_never_compiled(rnn):
    """No frame of lstmwatch's reaches Dynamo: not the forward hook, not the subclass's kernel-call wrapper, not the
    gradient hooks of a backward run inside a compiled function. Before, watching the 'whole' case made Dynamo
    try 26 more frames, make 5 more graphs, break 5 and recompile once; with the backward inside a compiled
    function, 35 more frames, 14 more graphs, 5 more graph breaks and 8 recompilations, or an error raised from
    inside Dynamo into the training loop."""
    run(rnn, _compile_whole, watch="after", compiled_step=True)
    tried = [c.co_filename for c in map(lambda ref: ref(), convert_frame.input_codes.seen) if c is not None]
    assert tried  # Dynamo did look at frames: the model's
    pkg = os.path.dirname(os.path.abspath(lstmwatch.__file__)) + os.sep  # not a venv whose path says lstmwatch
    assert not [f for f in tried if os.path.abspath(f).startswith(pkg)]


@pytest.mark.parametrize("rnn", ["cell", "allow_rnn"])
def test_a_traced_forward_adds_nothing_to_the_graph_and_is_said(rnn):
    """A module Dynamo traces (an nn.LSTMCell; nn.LSTM under allow_rnn): the hook adds nothing to the graph,
    so its forward is not seen (no gates), the gradient hooks go on, and a note says so once."""
    kind = "cell" if rnn == "cell" else "lstm"
    with torch._dynamo.config.patch(allow_rnn=rnn == "allow_rnn"):
        plain, plain_counts, _, _ = run(kind, _compile_whole)
        model, counts, records, notes = run(kind, _compile_whole, watch="after")
    assert_params_equal(plain, model)
    assert counts == plain_counts
    assert [r.step for r in records] == LOGGED
    for r in records:
        assert r.stats["rnn/grad_norm"] > 0
        assert not any("/forget/sat_right" in k or "/update_ratio" in k for k in r.stats)
    assert len(notes) == 1 and "traced into a torch.compile graph" in notes[0]


def test_a_submodule_compiled_in_place_is_named_as_the_user_named_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)

    net = Net()
    net.rnn = torch.compile(net.rnn, backend="eager")
    with lstmwatch.watch(net, console=False) as w:
        assert w.modules == ["rnn"]
    with lstmwatch.watch(torch.compile(nn.LSTM(3, 4), backend="eager"), console=False) as w:
        assert w.modules == ["lstm"]
