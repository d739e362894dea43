"""lstm_cell_gates and gru_cell_gates against nn.LSTMCell / nn.GRUCell's own outputs; a GRU named as one (no
forget gate) in events and figures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.detectors import GateSaturation, HiddenSaturation, NoGradient, VanishingGradient
from lstmwatch.events import Event, Record

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SIZES = [(3, 5, 4), (1, 1, 1), (7, 2, 3)]  # (input features, hidden, batch)
HX = ("none", "tuple", "list")
LARGEST: dict[str, float] = {}


def err(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    e = (a.double() - b.double()).abs().max().item()
    label = str(dtype).removeprefix("torch.")
    LARGEST[label] = max(LARGEST.get(label, 0.0), e)
    return e


def inputs(f: int, h: int, b: int, batched: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    shape = (b,) if batched else ()
    return (torch.randn(*shape, f, dtype=dtype), torch.randn(*shape, h, dtype=dtype),
            torch.randn(*shape, h, dtype=dtype))


def in_ranges(g: dict[str, torch.Tensor], sigmoid: tuple[str, ...], tanh: tuple[str, ...]) -> None:
    for k in sigmoid:
        assert ((g[k] >= 0) & (g[k] <= 1)).all(), k
    for k in tanh:
        assert ((g[k] >= -1) & (g[k] <= 1)).all(), k


GRID = list(itertools.product(SIZES, (True, False), HX, (True, False), DTYPES))


@pytest.mark.parametrize("size,batched,hx,bias,dtype", GRID)
def test_lstm_cell_gates(size: tuple[int, int, int], batched: bool, hx: str, bias: bool, dtype: str) -> None:
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    f, h, b = size
    cell = nn.LSTMCell(f, h, bias=bias).to(dt)
    x, h0, c0 = inputs(f, h, b, batched, dt)
    state = None if hx == "none" else ((h0, c0) if hx == "tuple" else [h0, c0])
    want_h, want_c = cell(x, None if state is None else tuple(state))
    got = lstmwatch.lstm_cell_gates(cell, x, state)
    assert isinstance(got, lstmwatch.CellGates)
    shape = (b, h) if batched else (h,)
    assert all(t.shape == shape and t.dtype == dt for t in got)
    assert err(got.h, want_h, dt) < TOL[dt]
    assert err(got.c, want_c, dt) < TOL[dt]
    in_ranges(got._asdict(), ("i", "f", "o"), ("g", "h"))
    if state is None:
        assert err(got.c, got.i * got.g, dt) < TOL[dt]  # a zero c0: nothing is remembered


@pytest.mark.parametrize("size,batched,hx,bias,dtype", [g for g in GRID if g[2] != "list"])
def test_gru_cell_gates(size: tuple[int, int, int], batched: bool, hx: str, bias: bool, dtype: str) -> None:
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    f, h, b = size
    cell = nn.GRUCell(f, h, bias=bias).to(dt)
    x, h0, _ = inputs(f, h, b, batched, dt)
    state = None if hx == "none" else h0
    want = cell(x, state)
    got = lstmwatch.gru_cell_gates(cell, x, state)
    assert isinstance(got, lstmwatch.GRUCellGates)
    shape = (b, h) if batched else (h,)
    assert all(t.shape == shape and t.dtype == dt for t in got)
    assert err(got.h, want, dt) < TOL[dt]
    in_ranges(got._asdict(), ("r", "z"), ("n",))


def test_cell_steps_chain_like_the_module() -> None:
    """Stepping the functions along a sequence gives what stepping the cells gives."""
    torch.manual_seed(1)
    lstm, gru = nn.LSTMCell(3, 4).double(), nn.GRUCell(3, 4).double()
    xs = torch.randn(5, 2, 3, dtype=torch.float64)
    hc: tuple[torch.Tensor, torch.Tensor] | None = None
    g = None
    state, hg = None, None
    for x in xs:
        hc = lstm(x, hc)
        g = lstmwatch.lstm_cell_gates(lstm, x, state)
        state = (g.h, g.c)
        hg_new = gru(x, hg)
        assert torch.allclose(lstmwatch.gru_cell_gates(gru, x, hg).h, hg_new, atol=1e-12)
        hg = hg_new
        assert torch.allclose(g.h, hc[0], atol=1e-12) and torch.allclose(g.c, hc[1], atol=1e-12)


def test_cell_gates_no_grad_and_types() -> None:
    cell = nn.LSTMCell(3, 4)
    x = torch.randn(2, 3, requires_grad=True)
    assert not lstmwatch.lstm_cell_gates(cell, x).h.requires_grad
    with pytest.raises(TypeError, match="nn.LSTMCell"):
        lstmwatch.lstm_cell_gates(nn.GRUCell(3, 4), x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.GRUCell"):
        lstmwatch.gru_cell_gates(cell, x)  # type: ignore[arg-type]


def test_report_largest() -> None:
    """Runs last in this file: prints the largest reproduction errors of the grid."""
    print("largest cell errors:", {k: f"{v:.2e}" for k, v in LARGEST.items()})


# --- each type named correctly: a GRU has no forget gate, and set_forget_bias raises for it

LSTM_ONLY = ("forget", "set_forget_bias", "LSTM")


def typed_rec(step: int, gru: bool, over: dict[str, float]) -> Record:
    """A record of one 2-layer module 'm', a GRU's gates (reset, update, new) or an LSTM's, with `over` added."""
    s: dict[str, float] = {"grad_norm": 0.3, "m/grad_norm": 0.3, "m/grads_seen": 1.0, "m/trainable": 1.0,
                           "m/gtt/ratio": 3e-5, "loss_mean": 0.5}
    sigmoid = ("reset", "update") if gru else ("input", "forget", "output")
    for k in range(2):
        p = f"m/l{k}"
        s.update({f"{p}/grad_norm": 0.3, f"{p}/update_ratio": 1e-3, f"{p}/h/sat": 0.0,
                  f"{p}/{'new' if gru else 'cell'}/sat": 0.0})
        if not gru:
            s[f"{p}/c/sat"] = 0.0
        for g in sigmoid:
            s.update({f"{p}/{g}/mean": 0.5, f"{p}/{g}/sat_left": 0.0, f"{p}/{g}/sat_right": 0.0})
    s.update(over)
    return Record(step, 0.5, s, {}, None, ("m",))


FAULTS = {  # detector, the statistics that plant its fault in either type
    "gate_saturation": (GateSaturation, lambda gru: {f"m/l0/{'update' if gru else 'forget'}/sat_right": 0.95}),
    "hidden_saturation": (HiddenSaturation, lambda gru: {"m/l0/h/sat": 0.95}),
    "vanishing_gradient": (VanishingGradient, lambda gru: {"m/l0/grad_norm": 1e-6}),
    "no_gradient": (NoGradient, lambda gru: {"m/grads_seen": 0.0}),
    "frozen": (NoGradient, lambda gru: {"m/grads_seen": 0.0, "m/trainable": 0.0}),
}


def fire(kind: str, gru: bool) -> list[Event]:
    det, over = FAULTS[kind]
    d = det()
    out: list[Event] = []
    for step in (1, 2, 4, 8, 16):
        out += d.update(typed_rec(step, gru, over(gru)))
    assert out, kind
    return out


@pytest.mark.parametrize("kind", FAULTS)
def test_a_gru_s_events_never_mention_the_forget_gate_or_an_lstm(kind: str) -> None:
    for e in fire(kind, gru=True):
        text = e.message + " " + e.hint
        assert not any(w in text for w in LSTM_ONLY), text
    if kind in ("no_gradient", "frozen"):
        assert any("GRU" in e.message + e.hint for e in fire(kind, gru=True))


@pytest.mark.parametrize("kind", FAULTS)
def test_an_lstm_s_events_keep_their_words(kind: str) -> None:
    text = " ".join(e.message + " " + e.hint for e in fire(kind, gru=False))
    assert ("set_forget_bias" in text) == (kind != "no_gradient" and kind != "frozen")
    assert "GRU" not in text


class Grus(nn.Module):
    """An nn.GRU, then an nn.GRUCell stepped by hand over its outputs, with weights large enough to saturate."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8, num_layers=2, batch_first=True)
        self.cell = nn.GRUCell(8, 8)
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            for p in self.gru.parameters():
                p.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        h = None
        for t in range(out.shape[1]):
            h = self.cell(out[:, t], h)
        assert h is not None
        return self.head(h)


def gru_run(tmp: Path) -> lstmwatch.Watcher:
    torch.manual_seed(0)
    model = Grus()
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    w = lstmwatch.watch(model, log_every=1, console=False, log_path=tmp / "run.jsonl")
    with w:
        for _ in range(8):
            x = 5 * torch.randn(4, 6, 3)
            loss = (model(x) - x[:, :1, 0]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    return w


def test_a_gru_run_and_its_figure_never_say_forget(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    from lstmwatch.report.figure import figure

    w = gru_run(tmp_path)
    assert "gate_saturation" in {e.kind for e in w.events}  # the words below are checked on a real finding
    for e in w.events:
        assert not any(word in e.message + e.hint for word in LSTM_ONLY), e
    fig = figure(w)
    texts = [t.get_text() for t in fig.findobj(Text)]
    legends = [t.get_text() for leg in fig.findobj(Legend) for t in leg.get_texts()]
    assert any("update gate near 1" in t for t in texts)
    assert "all GRUs" in legends and "reset gate" in legends
    for t in texts + legends:
        assert "forget" not in t and "LSTM" not in t, t
