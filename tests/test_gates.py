"""lstm_gates and gru_gates against nn.LSTM / nn.GRU and against a hand-written recurrence."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstmwatch

F, H = 3, 5
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
BF16_TOL = 5e-2
LARGEST: dict[str, float] = {}


@dataclass(frozen=True)
class Cfg:
    layers: int = 1
    bidir: bool = False
    batch_first: bool = False
    proj: int = 0
    bias: bool = True
    inp: str = "plain"  # plain, sorted, unsorted (PackedSequence), unbatched
    state: bool = False
    autocast: bool = False
    dropout: float = 0.0
    B: int = 4
    T: int = 6

    @property
    def d(self) -> int:
        return 2 if self.bidir else 1

    @property
    def out(self) -> int:
        return self.proj or H


CONFIGS = {
    "base": Cfg(),
    "batch_first": Cfg(batch_first=True),
    "layers2": Cfg(layers=2),
    "layers3": Cfg(layers=3),
    "bidir": Cfg(bidir=True),
    "bidir_layers2": Cfg(bidir=True, layers=2),
    "bidir_batch_first": Cfg(bidir=True, batch_first=True),
    "proj": Cfg(proj=3),
    "proj_layers2": Cfg(proj=3, layers=2),
    "proj_bidir": Cfg(proj=2, bidir=True),
    "no_bias": Cfg(bias=False),
    "no_bias_bidir_layers2": Cfg(bias=False, bidir=True, layers=2),
    "packed_sorted": Cfg(inp="sorted"),
    "packed_unsorted": Cfg(inp="unsorted"),
    "packed_unsorted_batch_first": Cfg(inp="unsorted", batch_first=True),
    "packed_sorted_bidir": Cfg(inp="sorted", bidir=True),
    "packed_unsorted_bidir_layers2": Cfg(inp="unsorted", bidir=True, layers=2),
    "packed_proj": Cfg(inp="unsorted", proj=3),
    "packed_no_bias_bidir": Cfg(inp="unsorted", bias=False, bidir=True),
    "packed_state": Cfg(inp="unsorted", state=True),
    "unbatched": Cfg(inp="unbatched"),
    "unbatched_bidir_layers2": Cfg(inp="unbatched", bidir=True, layers=2),
    "unbatched_proj_state": Cfg(inp="unbatched", proj=3, state=True),
    "state": Cfg(state=True),
    "state_bidir_layers2_batch_first": Cfg(state=True, bidir=True, layers=2, batch_first=True),
    "state_proj": Cfg(state=True, proj=3),
    "single_step": Cfg(T=1),
    "batch1": Cfg(B=1),
    "dropout_eval": Cfg(dropout=0.5, layers=2),
    "autocast_bf16": Cfg(autocast=True),
    "autocast_bf16_bidir_packed_proj": Cfg(autocast=True, bidir=True, layers=2, inp="unsorted", proj=3),
    "everything": Cfg(inp="unsorted", bidir=True, layers=3, proj=3, batch_first=True, state=True),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def max_err(a: torch.Tensor, b: torch.Tensor, label: str) -> float:
    """Largest absolute difference, also kept in LARGEST[label]."""
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    LARGEST[label] = max(LARGEST.get(label, 0.0), err)
    return err


def lengths_of(cfg: Cfg) -> list[int]:
    if cfg.inp == "sorted":
        return [6, 4, 3, 1]
    if cfg.inp == "unsorted":
        return [3, 6, 1, 4]
    return [cfg.T] * (1 if cfg.inp == "unbatched" else cfg.B)


def build(cfg: Cfg, dtype: torch.dtype):
    """The module, its input as the module takes it, a batch-first copy (B, T, F), lengths and state."""
    lstm = (
        nn.LSTM(
            F,
            H,
            num_layers=cfg.layers,
            bidirectional=cfg.bidir,
            batch_first=cfg.batch_first,
            proj_size=cfg.proj,
            bias=cfg.bias,
            dropout=cfg.dropout,
        )
        .to(dtype)
        .eval()
    )
    lengths = lengths_of(cfg)
    b = len(lengths)
    x = torch.randn(b, cfg.T, F, dtype=dtype)
    for r, n in enumerate(lengths):
        x[r, n:] = 0
    if cfg.inp in ("sorted", "unsorted"):
        xin = x if cfg.batch_first else x.transpose(0, 1)
        inp = pack_padded_sequence(
            xin, torch.tensor(lengths), batch_first=cfg.batch_first, enforce_sorted=cfg.inp == "sorted"
        )
    elif cfg.inp == "unbatched":
        inp = x[0]
    else:
        inp = x if cfg.batch_first else x.transpose(0, 1).contiguous()
    hx = None
    if cfg.state:
        h0 = torch.randn(cfg.layers * cfg.d, b, cfg.out, dtype=dtype)
        c0 = torch.randn(cfg.layers * cfg.d, b, H, dtype=dtype)
        hx = (h0[:, 0], c0[:, 0]) if cfg.inp == "unbatched" else (h0, c0)
    return lstm, inp, x, lengths, hx


def run_module(cfg: Cfg, lstm: nn.LSTM, inp, hx):
    """The module's output (B, T, D * P), h_n (L * D, B, P) and c_n, batch first."""
    out, (hn, cn) = lstm(inp, hx)
    if isinstance(out, PackedSequence):
        out = pad_packed_sequence(out, batch_first=True)[0]
    elif cfg.inp == "unbatched":
        out, hn, cn = out.unsqueeze(0), hn.unsqueeze(1), cn.unsqueeze(1)
    elif not cfg.batch_first:
        out = out.transpose(0, 1)
    return out, hn, cn


def autocast(cfg: Cfg):
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.autocast else contextlib.nullcontext()


def tolerance(cfg: Cfg, dtype: torch.dtype) -> tuple[float, str]:
    if cfg.autocast and dtype == torch.float32:
        return BF16_TOL, "module/bf16"
    return TOL[dtype], "module/" + str(dtype).removeprefix("torch.")


def reference_lstm(lstm: nn.LSTM, x: torch.Tensor, h0=None, c0=None) -> dict:
    """One sequence x (T, F) through the documented LSTM equations, step by step, in float64.

    Returns {(layer, direction): {'i', 'f', 'g', 'o', 'c', 'h': (T, .), 'h_n', 'c_n'}}.
    """
    w = {n: p.detach().double() for n, p in lstm.named_parameters()}
    d = 2 if lstm.bidirectional else 1
    hs, ps = lstm.hidden_size, lstm.proj_size or lstm.hidden_size
    inp = x.double()
    res = {}
    for k in range(lstm.num_layers):
        outs = []
        for j in range(d):
            sfx = f"_l{k}" + ("_reverse" if j else "")
            w_ih, w_hh, w_hr = w["weight_ih" + sfx], w["weight_hh" + sfx], w.get("weight_hr" + sfx)
            b_ih = w.get("bias_ih" + sfx, torch.zeros(4 * hs, dtype=torch.float64))
            b_hh = w.get("bias_hh" + sfx, torch.zeros(4 * hs, dtype=torch.float64))
            h = h0[k * d + j].double() if h0 is not None else torch.zeros(ps, dtype=torch.float64)
            c = c0[k * d + j].double() if c0 is not None else torch.zeros(hs, dtype=torch.float64)
            n = inp.shape[0]
            rows = {key: [None] * n for key in "ifgoch"}
            for t in reversed(range(n)) if j else range(n):
                z_i = w_ih @ inp[t] + b_ih
                z_h = w_hh @ h + b_hh
                i = torch.sigmoid(z_i[0:hs] + z_h[0:hs])
                f = torch.sigmoid(z_i[hs : 2 * hs] + z_h[hs : 2 * hs])
                g = torch.tanh(z_i[2 * hs : 3 * hs] + z_h[2 * hs : 3 * hs])
                o = torch.sigmoid(z_i[3 * hs :] + z_h[3 * hs :])
                c = f * c + i * g
                h = o * torch.tanh(c)
                if w_hr is not None:
                    h = w_hr @ h
                for key, v in zip("ifgoch", (i, f, g, o, c, h)):
                    rows[key][t] = v
            res[(k, j)] = {key: torch.stack(v) for key, v in rows.items()} | {"h_n": h, "c_n": c}
            outs.append(res[(k, j)]["h"])
        inp = torch.cat(outs, dim=1)
    return res


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_reproduces_module_output_and_final_state(cfg, dtype):
    lstm, inp, _, lengths, hx = build(cfg, dtype)
    with torch.no_grad(), autocast(cfg):
        out, hn, cn = run_module(cfg, lstm, inp, hx)
        traces = lstmwatch.lstm_gates(lstm, inp, hx)
    tol, label = tolerance(cfg, dtype)
    last = traces[-cfg.d :]
    got = torch.cat([tr.h for tr in last], dim=2)
    assert got.shape == out.shape
    assert max_err(got, out, label) <= tol
    assert len(traces) == cfg.layers * cfg.d
    for idx, tr in enumerate(traces):
        for r, n in enumerate(lengths):
            t = 0 if tr.direction == 1 else n - 1
            assert max_err(tr.h[r, t], hn[idx, r], label) <= tol, (idx, r)
            assert max_err(tr.c[r, t], cn[idx, r], label) <= tol, (idx, r)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_gates_match_reference_recurrence(cfg, dtype):
    lstm, inp, x, lengths, hx = build(cfg, dtype)
    with torch.no_grad(), autocast(cfg):
        traces = lstmwatch.lstm_gates(lstm, inp, hx)
    tol = TOL[dtype]
    b, t_max = len(lengths), max(lengths)
    assert [(tr.layer, tr.direction) for tr in traces] == [(k, j) for k in range(cfg.layers) for j in range(cfg.d)]
    if hx is not None and cfg.inp == "unbatched":
        hx = tuple(s.unsqueeze(1) for s in hx)
    for r, n in enumerate(lengths):
        h0, c0 = (hx[0][:, r], hx[1][:, r]) if hx is not None else (None, None)
        ref = reference_lstm(lstm, x[r, :n], h0, c0)
        if not cfg.autocast:
            with torch.no_grad():
                own, (hn, cn) = lstm(x[r, :n], (h0, c0) if hx is not None else None)
            assert torch.allclose(ref[(cfg.layers - 1, 0)]["h"][:, : cfg.out], own[:, : cfg.out].double(), atol=tol)
            assert torch.allclose(torch.stack([v["c_n"] for v in ref.values()]), cn.double(), atol=tol)
        for tr in traces:
            want = ref[(tr.layer, tr.direction)]
            for key in "ifgoch":
                got = getattr(tr, key)
                assert got.dtype == dtype
                assert got.shape == (b, t_max, cfg.out if key == "h" else H)
                err = max_err(got[r, :n], want[key], "reference/" + str(dtype).removeprefix("torch."))
                assert err <= tol, (key, tr.layer, r)
            assert tr.mask.dtype == torch.bool and tr.mask.shape == (b, t_max)
            assert tr.mask[r, :n].all() and not tr.mask[r, n:].any()
            assert (tr.h[r, n:] == 0).all()


def test_training_mode_dropout_layer0_is_exact():
    lstm = nn.LSTM(F, H, num_layers=2, dropout=0.5).train()
    x = torch.randn(6, 4, F)
    with torch.no_grad():
        _, (hn, cn) = lstm(x)
        traces = lstmwatch.lstm_gates(lstm, x)
    assert torch.allclose(traces[0].h[:, -1], hn[0], atol=1e-5)
    assert torch.allclose(traces[0].c[:, -1], cn[0], atol=1e-5)


def test_gates_do_not_touch_grad_state():
    lstm = nn.LSTM(F, H)
    x = torch.randn(4, 2, F, requires_grad=True)
    traces = lstmwatch.lstm_gates(lstm, x)
    assert all(p.grad is None for p in lstm.parameters())
    assert torch.is_grad_enabled()
    assert isinstance(traces[0], lstmwatch.GateTrace)


GRU_CONFIGS = {
    "base": Cfg(),
    "bidir_layers2_batch_first": Cfg(bidir=True, layers=2, batch_first=True),
    "packed_unsorted_bidir": Cfg(inp="unsorted", bidir=True),
    "unbatched_state": Cfg(inp="unbatched", state=True, layers=2),
    "no_bias_state": Cfg(bias=False, state=True),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cfg", GRU_CONFIGS.values(), ids=GRU_CONFIGS.keys())
def test_gru_gates_reproduce_module(cfg, dtype):
    gru = nn.GRU(F, H, num_layers=cfg.layers, bidirectional=cfg.bidir, batch_first=cfg.batch_first, bias=cfg.bias).to(
        dtype
    )
    _, inp, _, lengths, hx = build(cfg, dtype)
    h0 = None
    if hx is not None:
        h0 = torch.randn(cfg.layers * cfg.d, *(() if cfg.inp == "unbatched" else (len(lengths),)), H, dtype=dtype)
    with torch.no_grad():
        out, hn = gru(inp, h0)
        traces = lstmwatch.gru_gates(gru, inp, h0)
    if isinstance(out, PackedSequence):
        out = pad_packed_sequence(out, batch_first=True)[0]
    elif cfg.inp == "unbatched":
        out, hn = out.unsqueeze(0), hn.unsqueeze(1)
    elif not cfg.batch_first:
        out = out.transpose(0, 1)
    tol = TOL[dtype]
    assert all(isinstance(tr, lstmwatch.GRUTrace) for tr in traces)
    assert max_err(torch.cat([tr.h for tr in traces[-cfg.d :]], dim=2), out, "gru") <= tol
    for idx, tr in enumerate(traces):
        for r, n in enumerate(lengths):
            t = 0 if tr.direction == 1 else n - 1
            assert max_err(tr.h[r, t], hn[idx, r], "gru") <= tol
        for key in ("r", "z", "n"):
            assert getattr(tr, key).shape == (len(lengths), max(lengths), H)


@pytest.mark.parametrize(
    "fn, module",
    [
        (lstmwatch.lstm_gates, nn.GRU(F, H)),
        (lstmwatch.lstm_gates, nn.Linear(F, H)),
        (lstmwatch.lstm_gates, nn.LSTMCell(F, H)),
        (lstmwatch.gru_gates, nn.LSTM(F, H)),
        (lstmwatch.gru_gates, nn.RNN(F, H)),
    ],
    ids=["lstm_gates-GRU", "lstm_gates-Linear", "lstm_gates-LSTMCell", "gru_gates-LSTM", "gru_gates-RNN"],
)
def test_wrong_module_type_raises_type_error(fn, module):
    with pytest.raises(TypeError):
        fn(module, torch.randn(4, 2, F))
