"""watch(): discovery and naming, the schedule, records, hooks and their removal, and no effect on training."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.schedule import schedule

F, H = 3, 6


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(F, H, bidirectional=True)
        self.blocks = nn.Sequential(nn.Linear(2 * H, H), nn.ModuleDict({"rnn": nn.LSTM(H, H, batch_first=True)}))
        self.dec = nn.LSTM(H, H, num_layers=2)
        self.head = nn.Linear(H, 1)

    def forward(self, x):  # x (T, B, F)
        out, _ = self.enc(x)
        out = self.blocks[0](out)
        out, _ = self.blocks[1]["rnn"](out.transpose(0, 1))
        out, _ = self.dec(out.transpose(0, 1))
        return self.head(out).pow(2).mean()


class Tagger(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.enc = nn.LSTM(F, H, **kw)
        self.head = nn.Linear(H * (2 if kw.get("bidirectional") else 1), 1)

    def forward(self, x):  # x (T, B, F)
        out, _ = self.enc(x)
        return self.head(out).pow(2).mean()


def hooks_of(model: nn.Module) -> tuple[int, int]:
    """Forward hooks on every module, post-accumulate-grad hooks on every parameter."""
    fwd = sum(len(m._forward_hooks) for m in model.modules())
    grad = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return fwd, grad


def train(model, w, steps, batch=4, t=5, opt=None, micro=1):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for _ in range(steps):
        for _ in range(micro):
            loss = model(torch.randn(t, batch, F))
            loss.backward()
        opt.step()
        opt.zero_grad()
        if w is not None:
            out.append(w.step(loss))
    return out


# --- discovery and naming


def test_finds_every_lstm_at_any_depth_by_qualified_name():
    model = Seq2Seq()
    with lstmwatch.watch(model, console=False) as w:
        assert w.modules == ["enc", "blocks.1.rnn", "dec"]


def test_root_lstm_is_named_lstm():
    with lstmwatch.watch(nn.LSTM(F, H), console=False) as w:
        assert w.modules == ["lstm"]


def test_data_parallel_prefix_is_stripped_and_training_runs():
    model = Tagger()
    dp = nn.DataParallel(model)
    with lstmwatch.watch(dp, log_every=1, console=False) as w:
        assert w.modules == ["enc"]
        train(dp, w, 2)
        assert [r.step for r in w.records] == [1, 2]
        assert "enc/l0/forget/sat_right" in w.latest.stats
    with lstmwatch.watch(nn.DataParallel(Seq2Seq()), modules=["blocks.*", "dec"], console=False) as w:
        assert w.modules == ["blocks.1.rnn", "dec"]


def test_torch_compile_wrapper_is_seen_through():
    model = Seq2Seq()
    compiled = torch.compile(model)
    assert compiled is not model
    with lstmwatch.watch(compiled, console=False) as w:
        assert w.modules == ["enc", "blocks.1.rnn", "dec"]


@pytest.mark.parametrize(
    "modules, expected",
    [
        (["dec"], ["dec"]),
        (["enc", "dec"], ["enc", "dec"]),
        (["blocks.*"], ["blocks.1.rnn"]),
        (["*c"], ["enc", "dec"]),
        (lambda name, m: m.bidirectional, ["enc"]),
        (lambda name, m: m.num_layers == 1, ["enc", "blocks.1.rnn"]),
    ],
    ids=["name", "names", "glob-prefix", "glob-suffix", "predicate-bidirectional", "predicate-layers"],
)
def test_modules_filter(modules, expected):
    with lstmwatch.watch(Seq2Seq(), modules=modules, console=False) as w:
        assert w.modules == expected


@pytest.mark.parametrize("model", [object(), "lstm", None, nn.LSTM], ids=["object", "str", "None", "class"])
def test_non_module_raises_type_error(model):
    with pytest.raises(TypeError):
        lstmwatch.watch(model)


def test_model_without_lstm_raises_value_error_listing_contents():
    model = nn.Sequential(nn.Linear(F, H), nn.Conv1d(H, H, 1))
    with pytest.raises(ValueError, match="Linear") as err:
        lstmwatch.watch(model)
    assert "Conv1d" in str(err.value)


def test_modules_matching_none_raises_value_error_listing_found():
    with pytest.raises(ValueError) as err:
        lstmwatch.watch(Seq2Seq(), modules=["decoder*"])
    for name in ("enc", "blocks.1.rnn", "dec"):
        assert name in str(err.value)
    with pytest.raises(ValueError):
        lstmwatch.watch(Seq2Seq(), modules=lambda n, m: False)
    # A misspelt name beside a good one: refused, naming it, not silently left out.
    with pytest.raises(ValueError, match="'decc'"):
        lstmwatch.watch(Seq2Seq(), modules=["enc", "decc"])


# --- the schedule


@pytest.mark.parametrize(
    "log_every, expected",
    [
        (1, list(range(1, 41))),
        (2, list(range(2, 41, 2)) + [1]),
        (5, [1, 2, 4] + list(range(5, 41, 5))),
        (8, [1, 2, 4] + list(range(8, 41, 8))),
        (10, [1, 2, 4, 8] + list(range(10, 41, 10))),
        (50, [1, 2, 4, 8, 16, 32]),
    ],
)
def test_schedule(log_every, expected):
    every = schedule(log_every)
    assert [s for s in range(1, 41) if every(s)] == sorted(expected)


def test_schedule_accepts_a_callable():
    every = schedule(lambda s: s % 3 == 0)
    assert [s for s in range(1, 13) if every(s)] == [3, 6, 9, 12]


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True], ids=["zero", "negative", "float", "str", "bool"])
def test_bad_log_every_is_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        lstmwatch.watch(Tagger(), log_every=bad, console=False)


@pytest.mark.parametrize(
    "log_every, expected",
    [(6, [1, 2, 4, 6, 12, 18]), (1, list(range(1, 21))), (lambda s: s in (3, 7, 20), [3, 7, 20])],
    ids=["six", "one", "callable"],
)
def test_records_appear_exactly_on_scheduled_steps(log_every, expected):
    model = Tagger()
    with lstmwatch.watch(model, log_every=log_every, console=False) as w:
        returned = train(model, w, 20)
    assert [r.step for r in w.records] == expected
    assert [r.step for r in returned if r is not None] == expected
    assert w.step_count == 20


# --- records


def test_step_takes_tensor_or_float_loss():
    model = Tagger()
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        loss = model(torch.randn(5, 4, F))
        loss.backward()
        r1 = w.step(loss)
        r2 = w.step(0.25)
    assert r1.loss == pytest.approx(loss.item(), rel=1e-6)
    assert r2.loss == 0.25
    assert isinstance(r1.loss, float)


def test_val_loss_forces_a_record():
    model = Tagger()
    with lstmwatch.watch(model, log_every=10, console=False) as w:
        train(model, w, 4)  # records at 1, 2, 4
        assert w.step(1.0) is None  # step 5
        r = w.step(2.0, val_loss=0.5)  # step 6: not scheduled
        r2 = w.step(3.0, val_loss=torch.tensor(0.75))
    assert r is not None and r.step == 6 and r.val_loss == 0.5
    assert r2.step == 7 and r2.val_loss == pytest.approx(0.75)
    assert [x.step for x in w.records] == [1, 2, 4, 6, 7]


def test_records_deque_latest_and_stats_keys():
    model = Seq2Seq()
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        assert w.latest is None
        train(model, w, 3)
    assert isinstance(w.records, deque)
    assert w.latest is w.records[-1] and w.latest.step == 3
    rec = w.latest
    assert isinstance(rec, lstmwatch.Record)
    for key in (
        "enc/l0/forget/sat_right",
        "enc/l0_reverse/forget/sat_right",
        "enc/l0/input/sat_left",
        "blocks.1.rnn/l0/output/mean",
        "dec/l1/forget/mean",
        "dec/l1/grad_norm",
        "grad_norm",
    ):
        assert key in rec.stats, key
        assert isinstance(rec.stats[key], float)
    assert not any(k.startswith("dec/l0_reverse") for k in rec.stats)
    assert all(isinstance(v, float) for v in rec.stats.values())
    for key in ("enc/gtt", "dec/gtt"):
        assert len(rec.curves[key]) == 5
    assert 0.0 <= rec.stats["enc/l0/forget/sat_right"] <= 1.0


def test_gradient_accumulation_two_backward_per_step():
    model = Tagger(num_layers=2)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        train(model, w, 4, micro=2)
    assert [r.step for r in w.records] == [1, 2, 3, 4]
    assert all(r.stats["enc/grad_norm"] > 0 for r in w.records)


def test_loss_on_final_hidden_state_only():
    lstm, head = nn.LSTM(F, H, num_layers=2), nn.Linear(H, 2)
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(2):
            _, (h_n, _) = lstm(torch.randn(5, 4, F))
            loss = nn.functional.cross_entropy(head(h_n[-1]), torch.tensor([0, 1, 1, 0]))
            loss.backward()
            w.step(loss)
    assert [r.step for r in w.records] == [1, 2]
    assert len(w.latest.curves["lstm/gtt"]) == 5


def test_training_under_bf16_autocast():
    model = Tagger(num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(5, 4, F))
            loss.float().backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    rec = w.latest
    assert rec.step == 2
    assert all(v == v for v in rec.stats.values())
    assert 0.0 < rec.stats["enc/l1/forget/mean"] < 1.0
    assert len(rec.curves["enc/gtt"]) == 5


def test_console_sink_on_a_healthy_run():
    model = Tagger()
    with lstmwatch.watch(model, log_every=2) as w:
        train(model, w, 4)
    assert [r.step for r in w.records] == [1, 2, 4]


# --- hooks


def test_close_removes_every_hook_and_is_idempotent():
    model = Seq2Seq()
    assert hooks_of(model) == (0, 0)
    w = lstmwatch.watch(model, log_every=1, console=False)
    fwd, grad = hooks_of(model)
    assert fwd == 3 and grad == sum(1 for n, p in model.named_parameters() if "head" not in n and "blocks.0" not in n)
    train(model, w, 2)
    w.close()
    assert hooks_of(model) == (0, 0)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_hooks_with_kwargs and not m._forward_pre_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    w.close()
    assert w.closed
    n = len(w.records)
    train(model, None, 2)
    assert len(w.records) == n


def test_context_manager_closes_even_on_error():
    model = Tagger()
    with pytest.raises(RuntimeError, match="boom"), lstmwatch.watch(model, console=False) as w:
        train(model, w, 1)
        raise RuntimeError("boom")
    assert w.closed
    assert hooks_of(model) == (0, 0)


def test_close_keeps_the_users_own_hooks():
    model = Tagger()
    calls = {"fwd": 0, "pre": 0, "grad": 0}
    model.enc.register_forward_hook(lambda m, a, o: calls.__setitem__("fwd", calls["fwd"] + 1))
    model.enc.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    model.enc.weight_hh_l0.register_post_accumulate_grad_hook(lambda p: calls.__setitem__("grad", calls["grad"] + 1))
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        train(model, w, 1)
    assert hooks_of(model) == (1, 1)
    assert len(model.enc._forward_pre_hooks) == 1
    train(model, None, 1)
    assert calls == {"fwd": 2, "pre": 2, "grad": 2}


def test_dropped_watcher_leaves_no_hooks():
    import gc

    from torch.optim.optimizer import _global_optimizer_pre_hooks

    model = Tagger()
    before = len(_global_optimizer_pre_hooks)
    for _ in range(3):  # a notebook cell run again and again, never closing
        w = lstmwatch.watch(model, console=False)
        assert len(_global_optimizer_pre_hooks) == before + 1
        del w
        gc.collect()
    assert hooks_of(model) == (0, 0)
    assert len(_global_optimizer_pre_hooks) == before  # no global optimizer hook left either


def test_second_watch_closes_the_first(capsys, recwarn):
    # A notebook cell run again: one line on stderr, no warning.
    model = Tagger()
    first = lstmwatch.watch(model, log_every=1, console=False)
    second = lstmwatch.watch(model, log_every=1)
    assert capsys.readouterr().err.strip() == "lstmwatch: this model was already watched; the earlier watcher is closed"
    lstmwatch.watch(model, log_every=1, console=False).close()  # console=False: not a word
    assert capsys.readouterr().err == ""
    second = lstmwatch.watch(model, log_every=1, console=False)
    assert not [w for w in recwarn.list if issubclass(w.category, lstmwatch.LSTMWatchWarning)]
    assert first.closed and not second.closed
    assert hooks_of(model) == (1, sum(1 for _ in model.enc.parameters()))
    train(model, second, 2)
    assert len(second.records) == 2 and len(first.records) == 0
    second.close()
    assert hooks_of(model) == (0, 0)


# --- no effect on training


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(F, 8, num_layers=2, dropout=0.3)
        self.head = nn.Linear(8, 1)

    def forward(self, x, y):
        out, _ = self.enc(x)
        return nn.functional.mse_loss(self.head(out[-1]), y)


def run_training(watched: bool, steps: int = 30):
    torch.manual_seed(0)
    model = Deep().train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    w = lstmwatch.watch(model, log_every=1, sample=2, console=False) if watched else None
    losses = []
    for _ in range(steps):
        x, y = torch.randn(7, 4, F), torch.randn(4, 1)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if w is not None:
            w.step(loss)
    if w is not None:
        assert len(w.records) == steps
        w.close()
    return model, losses, torch.random.get_rng_state()


def test_training_is_bit_identical_with_and_without_watch():
    plain, plain_losses, plain_rng = run_training(watched=False)
    watched, watched_losses, watched_rng = run_training(watched=True)
    for (name, a), b in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, watched_losses))
    assert torch.equal(plain_rng, watched_rng)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_parametrized_weights_are_read_as_the_forward_reads_them(rnn):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    plain = rnn(3, 8, num_layers=2)
    normed = weight_norm(rnn(3, 8, num_layers=2), "weight_hh_l1")
    with torch.no_grad():  # the same weights as the forward computes them
        for name, _ in plain.named_parameters():
            getattr(plain, name).copy_(getattr(normed, name))
    x = torch.randn(6, 4, 3)
    recs = []
    for model in (plain, normed):
        with lstmwatch.watch(model, log_every=1, console=False) as w:
            model(x)[0].pow(2).sum().backward()
            recs.append(w.step(1.0))
    name = rnn.__name__.lower()
    assert recs[1].modules == (name,)
    gate = "forget" if rnn is nn.LSTM else "update"
    for key in (f"{name}/l1/{gate}/mean", f"{name}/l0/h/absmean", f"{name}/gtt/ratio"):
        assert recs[1].stats[key] == pytest.approx(recs[0].stats[key], rel=1e-5), key
    # Its parameters are the parametrization's: their gradients count in layer 1's norm.
    assert {k for k in recs[1].stats if "original" in k} == {
        f"{name}/parametrizations.weight_hh_l1.original{i}/grad_norm" for i in (0, 1)}
    assert recs[1].stats[f"{name}/l1/grad_norm"] > 0


def test_a_probe_that_fails_skips_that_step_only_and_is_reported_once(monkeypatch):
    from lstmwatch.probes import LSTMProbe

    model = nn.LSTM(3, 8)
    w = lstmwatch.watch(model, log_every=1, console=False)
    internals = LSTMProbe._internals
    monkeypatch.setattr(LSTMProbe, "_internals", lambda self, step: 1 / 0)
    with pytest.warns(lstmwatch.LSTMWatchFailure, match="ZeroDivisionError"):
        model(torch.randn(5, 2, 3))[0].sum().backward()
        rec = w.step(1.0)  # training goes on, with what the other parts measured
    # The gates' recomputation failed: its statistics are left out, the gradient norms measured by the hooks stay.
    assert rec.loss == 1.0 and "lstm/l0/forget/sat_right" not in rec.stats and "lstm/grad_norm" in rec.stats
    model(torch.randn(5, 2, 3))[0].sum().backward()
    assert w.step(1.0).loss == 1.0  # fails again: no second warning (pytest turns one into an error)
    monkeypatch.setattr(LSTMProbe, "_internals", internals)  # the next step's statistics come back
    model(torch.randn(5, 2, 3))[0].sum().backward()
    rec = w.step(1.0)
    assert "lstm/grad_norm" in rec.stats and "lstm/l0/forget/sat_right" in rec.stats
    w.close()
