"""The probes never break, change or mark a training run.

What a hook reads is checked against nn.LSTM's own signature and shapes (a subclass, a user's hook, a list for a
state), a checkpoint's recomputation is not captured twice, a failure inside a hook is kept on the probe while
training goes on, and a copy or a pickle of a watched model carries nothing of lstmwatch. Each training case runs
against the same model trained unwatched: parameters bit-identical.
"""

from __future__ import annotations

import copy
import functools
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from field_models import SEED, F, H, T, assert_params_equal, batches, compare, mean_loss, train
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import lstmwatch
from lstmwatch import recurrence, stats
from lstmwatch.probes import base, capture, hooks, rnn
from lstmwatch.probes import cell as cell_probes


def _internal(record, name: str) -> dict[str, float]:
    """A module's statistics of its input and gates (all but gradients and the gradient through time)."""
    return {k: v for k, v in record.stats.items()
            if k.startswith(f"{name}/") and "/gtt" not in k and "grad_norm" not in k and "update_ratio" not in k
            and "/nonfinite/" not in k and k.split("/")[1] not in ("grads_seen", "trainable")}


def _gtt(record, name: str) -> list[str]:
    return [k for k in [*record.stats, *record.curves] if k.startswith(f"{name}/") and "/gtt" in k]


def _probe(watcher, name: str):
    return next(p for p in watcher.probes if p.name == name)


# --- what a forward hook reads


class OutputOnly(nn.LSTM):
    """Returns its output sequence alone."""

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own name
        return super().forward(input, hx)[0]


class Head(nn.Module):
    """An LSTM (returning a tuple or its output alone), then a head on its last step."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(H, 1)

    def forward(self, x):
        y = self.rnn(x)
        return mean_loss(self.head((y if isinstance(y, torch.Tensor) else y[0])[-1]))


@pytest.mark.parametrize("t", [2, T], ids=["output_with_2_rows", "longer"])
def test_a_subclass_returning_its_output_alone_gets_the_gates_of_nn_lstm(t):
    # T=2: the output has exactly 2 rows along dim 0, which unpacking as (out, finals) would silently accept.
    sub, ref = (compare(lambda rnn_type=rnn_type: Head(rnn_type(F, H)), batches(3, t=t), lambda m, x: m(x),
                        log_every=1) for rnn_type in (OutputOnly, nn.LSTM))
    assert_params_equal(sub.model, ref.model)
    for got, want in zip(sub.watcher.records, ref.watcher.records):
        inside = _internal(got, "rnn")
        assert "rnn/l0/forget/sat_right" in inside and "rnn/data/mean" in inside
        assert inside.keys() == _internal(want, "rnn").keys()
        for k in inside:
            if k.endswith(("mean", "std", "absmax", "std_max", "std_min")):  # fractions may flip at a bound
                assert inside[k] == pytest.approx(want.stats[k], rel=1e-5, abs=1e-6), k
        # The kernel's own call inside the subclass is observed: its real output gives the gradient through time.
        assert _gtt(got, "rnn")
        assert _gtt(want, "rnn")
    assert not _probe(sub.watcher, "rnn").failures


class Packing(nn.LSTM):
    """forward(x, lengths): its second argument is not a state."""

    def forward(self, x, lengths):
        _, (h, _) = super().forward(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return h[-1]


def test_a_subclass_taking_lengths_reads_them_as_no_state():
    lengths = [torch.tensor([T, 2, 1, T]), torch.tensor([3, T, 4, 1])]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = Packing(F, H), nn.Linear(H, 1)

        def forward(self, b):
            return mean_loss(self.head(self.rnn(*b)))

    pair = compare(Model, list(zip(batches(2), lengths)), lambda m, b: m(b), log_every=1)
    for rec in pair.watcher.records:
        assert "rnn/l0/forget/sat_right" in rec.stats and _gtt(rec, "rnn")  # from the packed kernel call
    assert not _probe(pair.watcher, "rnn").failures


def _call(module, *args, output=None, **kwargs):
    cell = recurrence.LSTM if isinstance(module, nn.LSTM) else recurrence.GRU
    x = capture.read_input(module, args, kwargs)
    if x is None:
        return None
    if output is None:
        output = module(*args, **kwargs)
    return capture.read_call(module, x, cell.finals, cell.sizes(module), args, kwargs, output)


def test_read_call_takes_only_what_has_nn_lstms_shape():
    lstm = nn.LSTM(F, H, num_layers=2, proj_size=3)
    x = torch.randn(T, 4, F)
    h0, c0 = torch.zeros(2, 4, 3), torch.zeros(2, 4, H)
    assert _call(lstm, x[..., :2]) is None  # not this module's input size
    assert _call(lstm, x.long(), output=()) is None
    assert _call(lstm, x, (h0, c0)).state is not None
    assert _call(lstm, x, [h0, c0]).state is not None  # a list, which nn.LSTM accepts
    assert _call(lstm, x, hx=(h0, c0)).state is not None
    out, (hn, cn) = lstm(x)
    assert _call(lstm, x, torch.tensor([T, 2, 1, T]), output=out).state is None  # lengths
    assert _call(lstm, x, (c0, h0), output=(out, (hn, cn))).state is None  # widths swapped: absent, not guessed
    assert [k for k, _ in _call(lstm, x).outputs] == ["out", "h_n", "c_n"]
    wrong = (out, out[:2], (out, hn), [out, (hn, cn)], {"output": out}, (out, (hn, cn, cn)), (out[:, :2], (hn, cn)),
             (out, (cn, hn)))  # the output alone, one with 2 rows, a list, a dict, states wrong in number or shape
    for other in wrong:
        assert _call(lstm, x, output=other).outputs is None, other
    packed = pack_padded_sequence(x, [T, 3, 2, 1])
    assert [k for k, _ in _call(lstm, packed).outputs] == ["out", "h_n", "c_n"]
    assert _call(lstm, packed, output=(out, (hn, cn))).outputs is None  # a padded output for a packed input
    unbatched = _call(lstm, x[:, 0], (h0[:, 0], c0[:, 0]))
    assert unbatched.unbatched and unbatched.state is not None and unbatched.outputs is not None
    gru = nn.GRU(F, H, bidirectional=True, batch_first=True)
    xb, g0 = torch.randn(4, T, F), torch.zeros(2, 4, H)
    got = _call(gru, xb, g0)
    assert got.state is not None and [k for k, _ in got.outputs] == ["out", "h_n"] and got.batch == 4
    assert _call(gru, xb, (g0, g0), output=()).state is None


class ListState(nn.Module):
    def __init__(self, as_list: bool, cell: bool):
        super().__init__()
        self.as_list, self.cell = as_list, cell
        self.rnn = nn.LSTMCell(F, H) if cell else nn.LSTM(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        b = x.shape[1]
        h, c = torch.full((b, H), 0.3), torch.full((b, H), -0.2)
        if self.cell:
            for t in range(x.shape[0]):
                h, c = self.rnn(x[t], [h, c] if self.as_list else (h, c))
            return mean_loss(self.head(h))
        hx = (h[None], c[None])
        out, _ = self.rnn(x, list(hx) if self.as_list else hx)
        return mean_loss(self.head(out[-1]))


@pytest.mark.parametrize("cell", [False, True], ids=["nn.LSTM", "nn.LSTMCell"])
def test_a_state_given_as_a_list_is_read_as_the_tuple(cell):
    got, want = (compare(lambda as_list=as_list: ListState(as_list, cell), batches(3), lambda m, x: m(x),
                         log_every=1) for as_list in (True, False))
    for a, b in zip(got.watcher.records, want.watcher.records):
        assert _internal(a, "rnn") == _internal(b, "rnn") and "rnn/l0/forget/sat_right" in a.stats
        assert sorted(_gtt(a, "rnn")) == sorted(_gtt(b, "rnn")) != []


@pytest.mark.parametrize("registered", ["before_watch", "after_watch"])
def test_lstmwatch_sees_the_output_before_a_users_hook_changes_it(registered):
    def out0(module, args, out):
        return out[0]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(F, H), nn.Linear(H, 1)
            if registered == "before_watch":
                self.rnn.register_forward_hook(out0)

        def forward(self, x):
            return mean_loss(self.head(self.rnn(x)[-1]))

    def after(model):
        if registered == "after_watch":
            model.rnn.register_forward_hook(out0)

    pair = compare(Model, batches(3), lambda m, x: m(x), after_watch=after, log_every=1)
    for rec in pair.watcher.records:
        assert "rnn/gtt/ratio" in rec.stats and "rnn/l0/forget/sat_right" in rec.stats


# --- torch.utils.checkpoint


class Checkpointed(nn.Module):
    def __init__(self, how: str, cell: bool = False):
        super().__init__()
        self.how = how
        self.pre = nn.Linear(F, F)
        self.rnn = nn.LSTMCell(F, H) if cell else nn.LSTM(F, H)
        self.head = nn.Linear(H, 1)

    def run(self, x):
        if isinstance(self.rnn, nn.LSTMCell):
            h = c = x.new_zeros(x.shape[1], H)
            hs = []
            for t in range(x.shape[0]):
                h, c = self.rnn(x[t], (h, c))
                hs.append(h)
            return torch.stack(hs)
        return self.rnn(x)[0]

    def forward(self, x):
        z = self.pre(x)
        out = self.run(z) if self.how == "none" else checkpoint(self.run, z, use_reentrant=self.how == "reentrant")
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


@pytest.mark.parametrize("cell", [False, True], ids=["nn.LSTM", "nn.LSTMCell"])
@pytest.mark.parametrize("how", ["non_reentrant", "non_reentrant_no_early_stop", "reentrant"])
def test_a_checkpoint_is_measured_once_as_without_it(how, cell):
    def run(how):
        with set_checkpoint_early_stop(how != "non_reentrant_no_early_stop"):  # without: every call recomputed
            return compare(lambda: Checkpointed(how.split("_no_")[0], cell), batches(4), lambda m, x: m(x),
                           log_every=1)

    got, want = run(how), run("none")
    assert_params_equal(got.model, want.model)
    for a, b in zip(got.watcher.records, want.watcher.records):
        assert _internal(a, "rnn").keys() == _internal(b, "rnn").keys()
        for k, v in _internal(b, "rnn").items():
            assert a.stats[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
        assert len(a.curves["rnn/gtt"]) == T  # one capture per timestep, none from the recomputation
        assert a.curves["rnn/gtt"] == pytest.approx(b.curves["rnn/gtt"], rel=1e-5, abs=1e-8)
    assert not _probe(got.watcher, "rnn").failures


def test_a_parametrized_lstm_under_a_checkpoint():
    def build():
        model = Checkpointed("non_reentrant")
        nn.utils.parametrizations.weight_norm(model.rnn, "weight_hh_l0")
        return model

    pair = compare(build, batches(3), lambda m, x: m(x), log_every=1)
    assert "rnn/l0/forget/sat_right" in pair.watcher.records[-1].stats
    assert not _probe(pair.watcher, "rnn").failures


# --- an empty batch


@pytest.mark.parametrize("cell", [False, True], ids=["nn.LSTM", "nn.LSTMCell"])
def test_an_empty_batch_on_a_logging_step_measures_nothing_and_fails_nothing(cell):
    data = batches(4)
    data[1] = torch.randn(T, 0, F)
    pair = compare(lambda: ListState(False, cell), data, lambda m, x: m(x), log_every=1)
    recs = {r.step: r for r in pair.watcher.records}
    assert not _internal(recs[2], "rnn") and not _gtt(recs[2], "rnn")
    assert "rnn/l0/forget/sat_right" in recs[3].stats and "rnn/data/mean" in recs[3].stats
    assert not _probe(pair.watcher, "rnn").failures
    assert stats.data_stats(torch.randn(0, T, F), torch.ones(0, T, dtype=torch.bool), packed=False) == {}


# --- a failure inside a hook


def _boom(*args, **kwargs):
    raise ZeroDivisionError("inside lstmwatch")


class _Exploding(list):
    def __setitem__(self, i, v):
        raise ZeroDivisionError("inside lstmwatch")


def _inject(where: str, cell: bool, watcher, mp: pytest.MonkeyPatch) -> str:
    """Make one of lstmwatch's hooks raise; what the probe will say failed."""
    if where == "parameter_gradient":
        mp.setattr(stats, "sumsq_blocks", _boom)
        return "gradient hook of "
    if where == "forward":
        mp.setattr(cell_probes if cell else rnn, "sample_window" if cell else "capture", _boom)
        return "forward hook"
    if cell:  # the cell probe's hook on each call's output
        mp.setattr(_probe(watcher, "rnn"), "_hgrads", _Exploding())
    else:
        mp.setattr(capture.Capture, "add_grad", _boom)
    return "gradient hook of its output"


@pytest.mark.parametrize("cell", [False, True], ids=["nn.LSTM", "nn.LSTMCell"])
@pytest.mark.parametrize("where", ["forward", "parameter_gradient", "output_gradient"])
def test_a_hook_that_fails_is_recorded_and_training_goes_on(where, cell):
    data = batches(3)
    torch.manual_seed(SEED)
    plain = ListState(False, cell)
    torch.manual_seed(SEED)
    model = ListState(False, cell)
    train(plain, data, lambda m, x: m(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # as field_models.train
    with warnings.catch_warnings(record=True):  # however the Watcher reports the failure
        warnings.simplefilter("always")
        w = lstmwatch.watch(model, log_every=1, console=False)
        probe = _probe(w, "rnn")
        for i, x in enumerate(data):
            with pytest.MonkeyPatch.context() as mp:
                what = _inject(where, cell, w, mp) if i == 0 else ""  # step 1: a hook fails, the step completes
                loss = model(x)
                loss.backward()
            opt.step()
            opt.zero_grad()
            if i == 0:
                assert probe.failures, "the failure was not recorded"
                assert all(f"rnn: {what}" in s and "probes" in s for s, _ in probe.failures), probe.failures
                assert all(isinstance(e, ZeroDivisionError) and e.__traceback__ is None for _, e in probe.failures)
            rec = w.step(loss)
            if i == 0:
                assert "rnn/grad_norm" not in rec.stats and not _internal(rec, "rnn"), "a failed capture was kept"
                probe.take_failures()
        w.close()
    assert_params_equal(plain, model)
    assert "rnn/grad_norm" in rec.stats and "rnn/l0/forget/sat_right" in rec.stats  # measured again
    assert not probe.failures


def test_take_failures_hands_them_over_once(monkeypatch):
    monkeypatch.setattr(stats, "sumsq_blocks", _boom)
    lstm = nn.LSTM(F, H)
    with lstmwatch.watch(lstm, log_every=1, console=False) as w:
        lstm(torch.randn(T, 2, F))[0].sum().backward()
        probe = w.probes[0]
        taken = probe.take_failures()
        assert len(taken) == 4 and probe.failures == [] and probe.take_failures() == []  # 4 parameters
        assert sorted(s.split(" (")[0] for s, _ in taken) == sorted(f"lstm: gradient hook of {n}"
                                                                    for n, _ in lstm.named_parameters())
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            w.step(1.0)


def test_failures_are_bounded_until_taken(monkeypatch):
    monkeypatch.setattr(stats, "sumsq_blocks", _boom)
    lstm = nn.LSTM(F, H)
    with lstmwatch.watch(lstm, log_every=1, console=False) as w:
        for _ in range(3):  # gradients accumulated over 3 backward passes: 4 parameters fail each time
            lstm(torch.randn(T, 2, F))[0].sum().backward()
        assert len(w.probes[0].failures) == base.MAX_FAILURES
        w.probes[0].take_failures()


# --- no mark on copies and pickles


def _users_hook(module, args, out):  # a picklable hook of the user's
    return None


def test_the_hook_table_copies_and_pickles_without_lstmwatch():
    lstm = nn.LSTM(F, H)
    with lstmwatch.watch(lstm, log_every=1, console=False):
        table = lstm._forward_hooks
        assert isinstance(table, hooks.HookTable) and len(table) == 1
        assert type(pickle.loads(pickle.dumps(table))) is OrderedDict and not pickle.loads(pickle.dumps(table))
        assert copy.deepcopy(table) == OrderedDict() and copy.copy(table) == OrderedDict()
        assert table.copy().hidden == table.hidden
        users = lstm.register_forward_hook(_users_hook)
        assert list(copy.deepcopy(lstm)._forward_hooks.values()) == [_users_hook]
        assert list(pickle.loads(pickle.dumps(lstm))._forward_hooks.values()) == [_users_hook]
    assert list(lstm._forward_hooks.values()) == [_users_hook]  # its handle points at the table, which stays
    users.remove()
    assert not lstm._forward_hooks
    with lstmwatch.watch(lstm, console=False):
        pass
    assert type(lstm._forward_hooks) is OrderedDict and type(lstm._forward_hooks_with_kwargs) is OrderedDict
    assert not lstm._forward_hooks and not lstm._forward_hooks_with_kwargs


def test_a_module_with_hooks_of_its_own_keeps_their_handles_and_copies_an_inert_entry(tmp_path):
    model = nn.Sequential(nn.LSTM(F, H))
    lstm = model[0]
    calls = []
    users = lstm.register_forward_hook(lambda m, a, o: calls.append(1))
    kept = lstm.register_forward_hook(_users_hook)
    x = torch.randn(T, 2, F)
    with lstmwatch.watch(model, log_every=1, console=False):
        assert type(lstm._forward_hooks) is OrderedDict and len(lstm._forward_hooks) == 3  # the user's dict, kept
        model(x)
        users.remove()  # the user's handle works while watched
        model(x)
        assert calls == [1]
        clone = copy.deepcopy(model)
        assert list(clone[0]._forward_hooks.values()) == [hooks.INERT, _users_hook]  # lstmwatch's comes first
        assert torch.equal(clone(x)[0], model(x)[0])  # the copy's entry does nothing
        kept.remove()
        path = tmp_path / "model.pt"
        torch.save(model, path)
    assert not lstm._forward_hooks
    code = textwrap.dedent(f"""
        import sys
        sys.modules["lstmwatch"] = None  # lstmwatch cannot be imported here
        import torch
        m = torch.load({str(path)!r}, weights_only=False)
        out, _ = m(torch.randn({T}, 2, {F}))
        print("LOADED", tuple(out.shape), len(m[0]._forward_hooks))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"LOADED ({T}, 2, {H}) 1" in proc.stdout, proc.stdout


def test_a_deepcopy_keeps_the_users_hooks_bound_to_the_copy():
    model = nn.Sequential(nn.LSTM(F, H))
    with lstmwatch.watch(model, log_every=1, console=False):
        model[0].register_forward_hook(functools.partial(_users_hook_of, model))
        clone = copy.deepcopy(model)
    (hook,) = clone[0]._forward_hooks.values()
    assert hook.args[0] is clone  # copied with the model, through the memo


def _users_hook_of(owner, module, args, out):
    return None


# --- the warnings registry


@pytest.mark.parametrize("rnn_type", [nn.LSTM, nn.GRU])
def test_a_logging_step_leaves_pythons_warnings_state_alone(rnn_type):
    model = rnn_type(F, H, num_layers=2)  # 2 layers: the lower layer runs the fused kernel
    registry: dict = {}
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")

        def note():  # a 'default' warning prints once per registry, until the filters change
            warnings.warn_explicit("once", UserWarning, "user.py", 1, registry=registry)

        note()
        with lstmwatch.watch(model, log_every=1, console=False) as w:
            out, _ = model(torch.randn(T, 2, F))
            out.sum().backward()
            w.step(1.0)
            note()
    assert [str(x.message) for x in log].count("once") == 1, "lstmwatch reset the warnings registry"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rnn_type", [nn.LSTM, nn.GRU])
def test_a_logging_step_on_cudnn_warns_nothing(rnn_type):
    model = rnn_type(F, H, num_layers=2).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lstmwatch.watch(model, log_every=1, console=False) as w:
            out, _ = model(torch.randn(T, 2, F, device="cuda"))
            out.sum().backward()
            rec = w.step(1.0)
    assert not _probe(w, "lstm" if rnn_type is nn.LSTM else "gru").failures
    assert any(k.endswith("/l0/update/mean") or k.endswith("/l0/forget/mean") for k in rec.stats)
