"""nn.LSTM / nn.GRU subclasses with a forward of their own: lstmwatch records what the recurrent kernel received.

A subclass's forward may take other arguments (`(x, lengths)`, packing inside) and return something else (the
output alone, a dict): lstmwatch watches the kernel's own call inside it (`super().forward(...)`), so the gates
are those of the packed sequence and the real initial state, and the gradient through time comes from the
kernel's real outputs. Each case is trained next to a twin: a plain module with the same weights, called the
same way from outside, watched the same way. Their records must agree, and training must stay bit-identical
with and without lstmwatch.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from field_models import SEED, B, F, H, T, assert_params_equal, batches, compare, gate_keys, mean_loss, train
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmwatch

STEPS = 4


def _hx(b, layers=1, dirs=1, cell=True):
    g = torch.Generator().manual_seed(SEED + 3)
    h = torch.randn(layers * dirs, b, H, generator=g) * 0.5
    c = torch.randn(layers * dirs, b, H, generator=g) * 0.5
    return (h, c) if cell else h


def _padded(n):
    g = torch.Generator().manual_seed(SEED + 7)
    out = []
    for x in batches(n, batch_first=True):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        mask = torch.arange(T)[None, :] < lengths[:, None]
        out.append((x * mask[..., None], lengths))
    return out


# --- the subclasses, as people write them
class OutputOnlyLSTM(nn.LSTM):
    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own name
        return super().forward(input, hx)[0]


class DictLSTM(nn.LSTM):
    def forward(self, input, hx=None):  # noqa: A002
        out, (h, c) = super().forward(input, hx)
        return {"output": out, "h_n": h, "c_n": c}


class PackingLSTM(nn.LSTM):
    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, (h, _) = super().forward(packed)
        return out, h


class PackingGRU(nn.GRU):
    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, h = super().forward(packed)
        return out, h


class ListStateLSTM(nn.LSTM):
    """Its own initial state, handed to the kernel as a list (or a tuple)."""

    as_list = True

    def forward(self, x):
        h, c = _hx(x.shape[1])
        return super().forward(x, [h, c] if self.as_list else (h, c))[0]


class TupleStateLSTM(ListStateLSTM):
    as_list = False


# --- the models: (model with the subclass, its plain twin), each with an `rnn` and a head
class Net(nn.Module):
    def __init__(self, rnn, width=H):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(width, 1)


class OutputOnly(Net):
    def forward(self, x):
        out = self.rnn(x) if isinstance(self.rnn, OutputOnlyLSTM) else self.rnn(x)[0]
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


class Dict(Net):
    def forward(self, x):
        if isinstance(self.rnn, DictLSTM):
            d = self.rnn(x)
            out, h = d["output"], d["h_n"]
        else:
            out, (h, _) = self.rnn(x)
        return mean_loss(self.head(out).transpose(0, 1).flatten(1)) + mean_loss(self.head(h[-1]))


class Packing(Net):
    def forward(self, x, lengths):
        if isinstance(self.rnn, (PackingLSTM, PackingGRU)):
            out, h = self.rnn(x, lengths)
        else:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, h = self.rnn(packed)
            h = h if isinstance(h, torch.Tensor) else h[0]
        return mean_loss(self.head(out.data)) + h[-1].pow(2).mean()


class ListState(Net):
    def forward(self, x):
        if isinstance(self.rnn, ListStateLSTM):
            out = self.rnn(x)
        else:
            out = self.rnn(x, _hx(x.shape[1]))[0]
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


class HookReplaced(Net):
    """A plain nn.LSTM whose output a user's forward hook replaces with out[0]."""

    def forward(self, x):
        out = self.rnn(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


def _replace_output(module, args, out):
    return out[0]


def _with_hook(m):
    m.rnn.register_forward_hook(_replace_output)
    return m


CASES = {
    "output_only": (lambda: OutputOnly(OutputOnlyLSTM(F, H)), lambda: OutputOnly(nn.LSTM(F, H)), batches(STEPS)),
    "dict": (lambda: Dict(DictLSTM(F, H, num_layers=2)), lambda: Dict(nn.LSTM(F, H, num_layers=2)), batches(STEPS)),
    "packing": (lambda: Packing(PackingLSTM(F, H, num_layers=2, bidirectional=True, batch_first=True), 2 * H),
                lambda: Packing(nn.LSTM(F, H, num_layers=2, bidirectional=True, batch_first=True), 2 * H),
                _padded(STEPS)),
    "packing_gru": (lambda: Packing(PackingGRU(F, H, batch_first=True)),
                    lambda: Packing(nn.GRU(F, H, batch_first=True)), _padded(STEPS)),
    "hx_list": (lambda: ListState(ListStateLSTM(F, H)), lambda: ListState(nn.LSTM(F, H)), batches(STEPS)),
    "hx_tuple": (lambda: ListState(TupleStateLSTM(F, H)), lambda: ListState(nn.LSTM(F, H)), batches(STEPS)),
    "users_hook": (lambda: _with_hook(HookReplaced(nn.LSTM(F, H))), lambda: HookReplaced(nn.LSTM(F, H)),
                   batches(STEPS)),
}


def _call(m, b):
    return m(*b) if isinstance(b, tuple) else m(b)


def _train_watched(model, data):
    watcher = lstmwatch.watch(model, log_every=1, sample=B, console=False)
    train(model, data, _call, watcher=watcher)
    watcher.close()
    return model, watcher


def _watched(build, data):
    torch.manual_seed(SEED)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lstmwatch.LSTMWatchFailure)
        return _train_watched(model, data)


def _module_view(record):
    return ({k: v for k, v in record.stats.items() if k.startswith("rnn/")},
            {k: v for k, v in record.curves.items() if k.startswith("rnn/")})


@pytest.mark.parametrize("case", list(CASES))
def test_record_is_the_plain_twins(case):
    build, build_twin, data = CASES[case]
    model, w = _watched(build, data)
    twin, wt = _watched(build_twin, data)
    assert_params_equal(model, twin)  # the same computation, so the same training
    records, twin_records = list(w.records), list(wt.records)
    assert [r.step for r in records] == [r.step for r in twin_records] == list(range(1, STEPS + 1))
    for r, rt in zip(records, twin_records):
        assert gate_keys(r, "rnn"), f"step {r.step}: no gate statistics"
        assert "rnn/gtt" in r.curves, f"step {r.step}: no gradient through time"
        stats, curves = _module_view(r)
        stats_t, curves_t = _module_view(rt)
        assert stats.keys() == stats_t.keys()
        assert stats == pytest.approx(stats_t, rel=1e-6, abs=1e-9, nan_ok=True)
        assert curves.keys() == curves_t.keys()
        for k in curves:
            assert curves[k] == pytest.approx(curves_t[k], rel=1e-6, abs=1e-9, nan_ok=True), k


def test_gates_are_those_of_the_packed_sequence():
    """The recorded gates are lstm_gates' on the packed input, with the real state: padding is not read as steps."""
    build, _, data = CASES["packing"]
    torch.manual_seed(SEED)
    model = build()
    ref = nn.LSTM(F, H, num_layers=2, bidirectional=True, batch_first=True)
    ref.load_state_dict(model.rnn.state_dict())
    with lstmwatch.watch(model, log_every=1, sample=B, console=False) as w:
        train(model, data[:1], _call, watcher=w)
    rec = w.records[0]
    x, lengths = data[0]
    traces = lstmwatch.lstm_gates(ref, pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    assert len(traces) == 4
    for tr in traces:
        label = f"l{tr.layer}" + ("_reverse" if tr.direction else "")
        for gate, name in (("i", "input"), ("f", "forget"), ("o", "output")):
            v = getattr(tr, gate)[tr.mask]  # (valid steps, H)
            assert rec.stats[f"rnn/{label}/{name}/mean"] == pytest.approx(v.mean().item(), rel=1e-5), (label, gate)
    assert "rnn/gtt" in rec.curves


@pytest.mark.parametrize("case", ["output_only", "dict", "packing", "packing_gru", "hx_list", "users_hook"])
def test_training_is_bit_identical(case):
    build, _, data = CASES[case]
    compare(build, data, _call, log_every=1, sample=B)


def test_kernel_forward_is_restored_when_the_last_probe_goes():
    lstm_fwd, gru_fwd = nn.LSTM.forward, nn.GRU.forward
    with lstmwatch.watch(OutputOnly(nn.LSTM(F, H)), console=False):  # plain: nothing patched
        assert nn.LSTM.forward is lstm_fwd
    a, b = OutputOnly(OutputOnlyLSTM(F, H)), OutputOnly(OutputOnlyLSTM(F, H))
    wa = lstmwatch.watch(a, console=False)
    wb = lstmwatch.watch(b, console=False)
    assert nn.LSTM.forward is not lstm_fwd and nn.GRU.forward is gru_fwd
    wa.close()
    assert nn.LSTM.forward is not lstm_fwd
    wb.close()
    assert nn.LSTM.forward is lstm_fwd


def test_unclosed_watcher_restores_it_when_the_model_is_collected():
    import gc

    lstm_fwd = nn.LSTM.forward
    model = OutputOnly(OutputOnlyLSTM(F, H))
    w = lstmwatch.watch(model, console=False)
    assert nn.LSTM.forward is not lstm_fwd
    del model, w
    gc.collect()
    assert nn.LSTM.forward is lstm_fwd


def test_unwatched_subclass_next_to_a_watched_one_is_untouched():
    """A second instance of the class, not watched, trains as it would and leaves the watched one's record alone."""
    build, _, data = CASES["output_only"]
    torch.manual_seed(SEED)
    other = build()
    torch.manual_seed(SEED)
    other_ref = build()
    model, w = _watched(build, data)
    train(other, data, _call)
    train(other_ref, data, _call)
    assert_params_equal(other, other_ref)
    assert all("rnn/gtt" in r.curves for r in w.records)


def test_two_threads_each_with_a_watched_subclass():
    build, build_twin, data = CASES["packing"]
    results, errors = {}, []
    models = []
    for _ in range(2):  # built here: the global RNG is shared by threads, a draw in one would shift the other's
        torch.manual_seed(SEED)
        models.append(build())

    def run(k):
        try:
            results[k] = _train_watched(models[k], data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    twin, wt = _watched(build_twin, data)
    for model, w in results.values():
        assert_params_equal(model, twin)
        assert [_module_view(r) for r in w.records] == [_module_view(r) for r in wt.records]


def test_torch_compile_of_a_model_with_a_watched_subclass():
    build, _, data = CASES["output_only"]
    torch.manual_seed(SEED)
    plain = build()
    train(plain, data, _call)
    torch.manual_seed(SEED)
    model = build()
    compiled = torch.compile(model)
    with lstmwatch.watch(compiled, log_every=1, console=False) as w:
        train(compiled, data, _call, watcher=w)
    assert_params_equal(plain, model)
    assert list(w.records)
