"""The logging step's production recomputation (lstmwatch.recurrence: fused kernel, written-out backward)
against the reference path (tests/reference_probe.py).

The reference path runs the recurrence of lstmwatch.gates step by step, takes dL/dh_t from autograd and
computes the gate statistics on its own; test_gates and test_grad_stats check it against nn.LSTM and an
unrolled nn.LSTMCell. Here every statistic and curve of the production path must equal it on the same step,
for every configuration: layers, directions, projections, packed sequences.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference_probe import use_reference
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstmwatch
from lstmwatch import recurrence
from lstmwatch.gates import rnn_params

F, H, T, B = 5, 7, 9, 6

CONFIGS = {
    "one_layer": {},
    "layers2": {"num_layers": 2},
    "layers3_batch_first": {"num_layers": 3, "batch_first": True},
    "proj": {"num_layers": 2, "proj_size": 4},
    "no_bias": {"num_layers": 2, "bias": False},
    "dropout_train": {"num_layers": 2, "dropout": 0.5},
    "bidir": {"bidirectional": True},
    "bidir_layers2_proj": {"num_layers": 2, "bidirectional": True, "proj_size": 4},
    "bidir_layers3_dropout_train": {"num_layers": 3, "bidirectional": True, "dropout": 0.5, "batch_first": True},
}
LENGTHS = (9, 3, 7, 1, 9, 5)  # a packed batch, unsorted
LOSSES = ("last_step", "every_step", "h_n_c_n")


def _loss(lstm: nn.LSTM, out, hn, cn, kind: str):
    if isinstance(out, PackedSequence):
        out = pad_packed_sequence(out, batch_first=True)[0]
    elif not lstm.batch_first and out.dim() == 3:
        out = out.transpose(0, 1)
    if kind == "last_step":
        return out[..., -1, :].pow(2).sum()
    if kind == "every_step":
        return (out * torch.linspace(-1, 1, out.shape[-2])[:, None]).sum()
    return hn.sum() + (0.5 * cn.pow(2).sum() if cn is not None else 0)


def _record(lstm: nn.LSTM, x, state, kind: str, reference: bool, monkeypatch, autocast: bool = False):
    """One logging step of a copy of lstm; through the reference path when asked."""
    lstm = copy.deepcopy(lstm)
    with monkeypatch.context() as mp:
        if reference:
            use_reference(mp)
        torch.manual_seed(3)  # the same dropout mask in both runs
        with lstmwatch.watch(lstm, log_every=1, sample=4, console=False) as w:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, hn = lstm(x, state)
                hn, cn = hn if isinstance(lstm, nn.LSTM) else (hn, None)
            out = out if isinstance(out, PackedSequence) else out.float()
            _loss(lstm, out, hn.float(), cn.float() if cn is not None else None, kind).backward()
            return w.step(1.0)


def _assert_same(production_rec, reference_rec):
    assert set(production_rec.stats) == set(reference_rec.stats)
    for k, v in reference_rec.stats.items():
        assert production_rec.stats[k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), k
    assert set(production_rec.curves) == set(reference_rec.curves)
    for k, v in reference_rec.curves.items():
        scale = max(map(abs, v), default=0.0)
        assert production_rec.curves[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * scale), k


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_production_path_equals_reference(kw, kind, monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, **kw)
    x = 2 * torch.randn(B, T, F) if kw.get("batch_first") else 2 * torch.randn(T, B, F)
    production_rec = _record(lstm, x, None, kind, False, monkeypatch)
    reference_rec = _record(lstm, x, None, kind, True, monkeypatch)
    assert "lstm/gtt" in production_rec.curves and "lstm/l0/forget/mean" in production_rec.stats
    _assert_same(production_rec, reference_rec)


@pytest.mark.parametrize("kind", ("every_step", "h_n_c_n"))
@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_production_path_equals_reference_on_packed_sequences(kw, kind, monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, **kw)
    x = 2 * torch.randn(B, T, F)
    for r, n in enumerate(LENGTHS):
        x[r, n:] = 0
    xin = x if kw.get("batch_first") else x.transpose(0, 1)
    packed = pack_padded_sequence(xin, torch.tensor(LENGTHS), batch_first=lstm.batch_first, enforce_sorted=False)
    state = (torch.randn(lstm.num_layers * (2 if lstm.bidirectional else 1), B, lstm.proj_size or H),
             torch.randn(lstm.num_layers * (2 if lstm.bidirectional else 1), B, H))
    _assert_same(_record(lstm, packed, state, kind, False, monkeypatch),
                 _record(lstm, packed, state, kind, True, monkeypatch))


def test_production_path_with_initial_state_and_unbatched_input(monkeypatch):
    torch.manual_seed(1)
    lstm = nn.LSTM(F, H, num_layers=2)
    state = (torch.randn(2, B, H), torch.randn(2, B, H))
    x = torch.randn(T, B, F)
    _assert_same(_record(lstm, x, state, "h_n_c_n", False, monkeypatch),
                 _record(lstm, x, state, "h_n_c_n", True, monkeypatch))
    one = (state[0][:, 0], state[1][:, 0])
    _assert_same(_record(lstm, x[:, 0], one, "every_step", False, monkeypatch),
                 _record(lstm, x[:, 0], one, "every_step", True, monkeypatch))


def test_production_path_under_autocast_recomputes_in_float32(monkeypatch):
    torch.manual_seed(2)
    lstm = nn.LSTM(F, H, num_layers=2)
    x = torch.randn(T, B, F)
    _assert_same(_record(lstm, x, None, "last_step", False, monkeypatch, autocast=True),
                 _record(lstm, x, None, "last_step", True, monkeypatch, autocast=True))


@pytest.mark.parametrize(
    "layers, dropout, train, autocast, calls",
    [
        (1, 0.0, True, False, 0),  # the output is the only layer's hidden state
        (3, 0.0, True, False, 2),  # the top layer from the output, the two below from the kernel
        (2, 0.5, True, False, 2),  # dropout ran below the top layer: its input is not what the recurrence sees
        (2, 0.5, False, False, 1),  # eval: no dropout
        (2, 0.0, True, True, 2),  # a bf16 output is not the float32 recurrence
    ],
)
def test_top_layer_comes_from_the_modules_output_when_it_is_the_recurrence(
        layers, dropout, train, autocast, calls, monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, num_layers=layers, dropout=dropout).train(train)
    seen = []
    kernel = recurrence._run_kernel
    monkeypatch.setattr(recurrence, "_run_kernel", lambda *a: seen.append(1) or kernel(*a))
    with lstmwatch.watch(lstm, log_every=1, sample=4, console=False) as w:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = lstm(torch.randn(T, B, F))
        out.float().sum().backward()
        rec = w.step(1.0)
    assert len(seen) == calls
    assert rec.stats[f"lstm/l{layers - 1}/h/absmean"] > 0


GRU_CONFIGS = {
    "one_layer": {},
    "layers2_batch_first": {"num_layers": 2, "batch_first": True},
    "bidir_layers2": {"num_layers": 2, "bidirectional": True},
    "no_bias_bidir": {"bias": False, "bidirectional": True},
    "dropout_train": {"num_layers": 2, "dropout": 0.5},
}


@pytest.mark.parametrize("packed", [False, True], ids=["tensor", "packed"])
@pytest.mark.parametrize("kind", ("last_step", "every_step", "h_n_c_n"))
@pytest.mark.parametrize("kw", GRU_CONFIGS.values(), ids=GRU_CONFIGS.keys())
def test_gru_production_path_equals_reference(kw, kind, packed, monkeypatch):
    torch.manual_seed(0)
    gru = nn.GRU(F, H, **kw)
    x = 2 * torch.randn(B, T, F)
    xin = x if gru.batch_first else x.transpose(0, 1)
    if packed:
        xin = pack_padded_sequence(xin, torch.tensor(LENGTHS), batch_first=gru.batch_first, enforce_sorted=False)
    state = torch.randn(gru.num_layers * (2 if gru.bidirectional else 1), B, H)
    production_rec = _record(gru, xin, state, kind, False, monkeypatch)
    assert "gru/gtt" in production_rec.curves and "gru/l0/update/mean" in production_rec.stats
    _assert_same(production_rec, _record(gru, xin, state, kind, True, monkeypatch))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
@pytest.mark.parametrize(
    "shape, dtype",
    [((1, B, F), torch.float32), ((T, 1, F), torch.float32), ((T, B, F), torch.float64)],
    ids=["one_step", "one_sequence", "float64"],
)
def test_production_path_on_edge_shapes(rnn, shape, dtype, monkeypatch):
    torch.manual_seed(4)
    module = rnn(F, H, num_layers=2, bidirectional=True).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    _assert_same(_record(module, x, None, "every_step", False, monkeypatch),
                 _record(module, x, None, "every_step", True, monkeypatch))


def test_a_packed_batch_is_never_padded_whole(monkeypatch):
    # The sampled rows are gathered from the packed data: the cost is the sample's, whatever the batch.
    import sys

    import torch.nn.utils.rnn as rnn_utils

    calls = []
    pad = rnn_utils.pad_packed_sequence
    counted = lambda *a, **k: calls.append(1) or pad(*a, **k)  # noqa: E731
    for mod in [rnn_utils] + [m for n, m in sys.modules.items() if n.startswith("lstmwatch")]:
        if hasattr(mod, "pad_packed_sequence"):
            monkeypatch.setattr(mod, "pad_packed_sequence", counted)
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, num_layers=2, bidirectional=True)
    lengths = torch.randint(1, T + 1, (64,))
    packed = pack_padded_sequence(torch.randn(T, 64, F), lengths, enforce_sorted=False)
    with lstmwatch.watch(lstm, log_every=1, sample=4, console=False) as w:
        out, (hn, cn) = lstm(packed)
        (out.data.sum() + hn.sum()).backward()
        rec = w.step(1.0)
    assert calls == [] and rec.stats["lstm/l1_reverse/forget/mean"] > 0


def test_the_backward_recurrence_leaves_its_inputs_as_they_were():
    # The LSTM's backward fills time-major buffers in place: the captured output gradients (which the gain reads
    # afterwards) and the recomputed internals must stay as they were.
    torch.manual_seed(0)
    lstm = nn.LSTM(F, H, num_layers=2, bidirectional=True, batch_first=True)
    steps = recurrence.Steps.of(torch.ones(B, T, dtype=torch.bool), full=True)
    with torch.no_grad():
        params = rnn_params(lstm)
        layers = recurrence.forward(recurrence.LSTM, params, lstm, torch.randn(B, T, F), steps)
        g_out, g_hn, g_cn = torch.randn(B, T, 2 * H), torch.randn(4, B, H), torch.randn(4, B, H)
        before = [t.clone() for t in (g_out, g_hn, g_cn)] + [t.clone() for ly in layers for t in ly]
        recurrence.backward(recurrence.LSTM, params, layers, lstm, steps, g_out, (g_hn, g_cn))
    after = [g_out, g_hn, g_cn] + [t for ly in layers for t in ly]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
