"""The statistics of a record against autograd and against direct computation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstmwatch

F, H = 3, 5
GATES = ("input", "forget", "cell", "output")
ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.enc = nn.LSTM(F, H, **kw)
        d = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(d * (kw.get("proj_size") or H), 1)

    def forward(self, x):  # x (T, B, F)
        out, _ = self.enc(x)
        return self.head(out).pow(2).mean()


def labels(lstm: nn.LSTM) -> list[str]:
    d = 2 if lstm.bidirectional else 1
    return [f"l{k}" + ("_reverse" if j else "") for k in range(lstm.num_layers) for j in range(d)]


def of_layer(tensors: dict[str, torch.Tensor], lab: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if n.endswith("_" + lab)}


def grads_of(lstm: nn.LSTM) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in lstm.named_parameters()}


def expected_grad_norms(name: str, lstm: nn.LSTM, grads: dict[str, torch.Tensor]) -> dict[str, float]:
    hs = lstm.hidden_size
    exp = {f"{name}/{n}/grad_norm": g.norm().item() for n, g in grads.items()}
    for lab in labels(lstm):
        exp[f"{name}/{lab}/grad_norm"] = math.sqrt(sum(g.pow(2).sum().item() for g in of_layer(grads, lab).values()))
        for k, gate in enumerate(GATES):
            sq = sum(
                grads[f"{r}_{lab}"][k * hs : (k + 1) * hs].pow(2).sum().item() for r in ROLES if f"{r}_{lab}" in grads
            )
            exp[f"{name}/{lab}/{gate}/grad_norm"] = math.sqrt(sq)
    exp[f"{name}/grad_norm"] = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
    return exp


def assert_stats(stats: dict[str, float], expected: dict[str, float], rel: float = 1e-5) -> None:
    for k, v in expected.items():
        assert k in stats, k
        assert stats[k] == pytest.approx(v, rel=rel, abs=1e-9), k


NORM_CONFIGS = {
    "base": {},
    "bidir_layers2": {"bidirectional": True, "num_layers": 2},
    "proj": {"proj_size": 3},
    "proj_bidir": {"proj_size": 2, "bidirectional": True},
    "no_bias": {"bias": False},
}


# --- gradient norms


@pytest.mark.parametrize("kw", NORM_CONFIGS.values(), ids=NORM_CONFIGS.keys())
def test_grad_norms_match_autograd(kw):
    model = Net(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        loss = model(torch.randn(6, 4, F))
        loss.backward()
        grads = grads_of(model.enc)
        opt.step()
        rec = w.step(loss)
    expected = expected_grad_norms("enc", model.enc, grads)
    assert_stats(rec.stats, expected)
    assert rec.stats["grad_norm"] == pytest.approx(expected["enc/grad_norm"], rel=1e-5)


def test_global_grad_norm_over_every_watched_lstm():
    enc, dec, head = nn.LSTM(F, H, num_layers=2), nn.LSTM(H, H, bidirectional=True), nn.Linear(2 * H, 1)
    model = nn.ModuleDict({"enc": enc, "dec": dec, "head": head})
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        loss = head(dec(enc(torch.randn(5, 3, F))[0])[0]).pow(2).mean()
        loss.backward()
        ge, gd = grads_of(enc), grads_of(dec)
        rec = w.step(loss)
    assert_stats(rec.stats, expected_grad_norms("enc", enc, ge) | expected_grad_norms("dec", dec, gd))
    total = sum(g.pow(2).sum().item() for g in [*ge.values(), *gd.values()])
    assert rec.stats["grad_norm"] == pytest.approx(math.sqrt(total), rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"bidirectional": True, "num_layers": 2}], ids=["base", "bidir_layers2"])
def test_grad_norms_of_accumulated_gradient(kw):
    model = Net(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(2):
            for _ in range(2):
                loss = model(torch.randn(6, 4, F))
                loss.backward()
            grads = grads_of(model.enc)
            opt.step()
            opt.zero_grad()
            rec = w.step(loss)
            assert_stats(rec.stats, expected_grad_norms("enc", model.enc, grads))


def test_grad_norms_right_when_step_follows_zero_grad():
    model = Net(num_layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(3):
            opt.zero_grad()
            loss = model(torch.randn(6, 4, F))
            loss.backward()
            grads = grads_of(model.enc)
            opt.step()
            opt.zero_grad()
            for p in model.parameters():
                assert p.grad is None
            rec = w.step(loss)
            assert_stats(rec.stats, expected_grad_norms("enc", model.enc, grads))


# --- update ratio


@pytest.mark.parametrize("kw", NORM_CONFIGS.values(), ids=NORM_CONFIGS.keys())
def test_update_ratio_matches_weights_before_and_after(kw):
    model = Net(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with lstmwatch.watch(model, log_every=1, console=False) as w:
        for _ in range(2):
            before = {n: p.detach().double().clone() for n, p in model.enc.named_parameters()}
            loss = model(torch.randn(6, 4, F))
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec = w.step(loss)
            after = {n: p.detach().double() for n, p in model.enc.named_parameters()}
            for lab in labels(model.enc):
                num = sum((after[n] - b).pow(2).sum().item() for n, b in of_layer(before, lab).items())
                den = sum(b.pow(2).sum().item() for b in of_layer(before, lab).values())
                assert num > 0
                assert rec.stats[f"enc/{lab}/update_ratio"] == pytest.approx(math.sqrt(num / den), rel=1e-4), lab


# --- gradient through time


@dataclass(frozen=True)
class GttCase:
    loss: str  # last_step, every_step, h_n, h_n_c_n, two_backward (last_step and every_step, backward apart)
    layers: int = 1
    bidir: bool = False
    batch_first: bool = False
    lengths: tuple[int, ...] = ()  # a PackedSequence (unsorted) when given
    unbatched: bool = False


T = 6
GTT_CASES = {
    "last_step": GttCase("last_step"),
    "last_step_bidir": GttCase("last_step", bidir=True),
    "every_step_layers2_batch_first": GttCase("every_step", layers=2, batch_first=True),
    "every_step_bidir": GttCase("every_step", bidir=True),
    "every_step_packed": GttCase("every_step", lengths=(3, 6, 1, 4)),
    "every_step_unbatched_bidir": GttCase("every_step", bidir=True, unbatched=True),
    "last_step_unbatched_layers2": GttCase("last_step", layers=2, unbatched=True),
    "h_n": GttCase("h_n"),
    "h_n_c_n_layers2": GttCase("h_n_c_n", layers=2),
    "h_n_packed_bidir": GttCase("h_n", bidir=True, lengths=(5, 2, 6, 4)),
    "two_backward_retain_graph": GttCase("two_backward", layers=2),
}


def case_losses(case: GttCase, out, hn, cn, lengths, extra, b=None) -> list:
    """The loss terms of one case from out (B, T, D * H) or, for one sequence b, out (n, D * H)."""
    head, y, r1, r2 = extra
    if b is not None:
        out, hn, cn = out[None], hn[:, None], cn[:, None]
        y, r1, r2, lengths = y[b : b + 1], r1[:, b : b + 1], r2[:, b : b + 1], lengths[b : b + 1]
    n = torch.tensor(lengths)
    terms = []
    if case.loss in ("last_step", "two_backward"):
        last = out[torch.arange(out.shape[0]), n - 1]
        terms.append((head(last) - y[:, 0]).pow(2).sum())
    if case.loss in ("every_step", "two_backward"):
        mask = (torch.arange(out.shape[1])[None, :] < n[:, None]).to(out.dtype)[..., None]
        terms.append(((head(out) - y[:, : out.shape[1]]).pow(2) * mask).sum())
    if case.loss.startswith("h_n"):
        terms.append((hn * r1).sum())
    if case.loss == "h_n_c_n":
        terms.append((cn * r2).sum())
    return terms


def reference_curves(lstm: nn.LSTM, x: torch.Tensor, lengths, case: GttCase, extra) -> dict[tuple[int, int], list]:
    """|dL/dh_t| over the batch for every (layer, direction), unrolling nn.LSTMCell per sequence in float64."""
    d = 2 if lstm.bidirectional else 1
    cells = {}
    for k in range(lstm.num_layers):
        for j in range(d):
            sfx = f"_l{k}" + ("_reverse" if j else "")
            cell = nn.LSTMCell(F if k == 0 else d * H, H).double()
            with torch.no_grad():
                for role in ROLES:
                    getattr(cell, role).copy_(getattr(lstm, role + sfx))
            cells[(k, j)] = cell
    extra = (copy.deepcopy(extra[0]).double(), *(e.double() for e in extra[1:]))
    seqs = {key: [] for key in cells}
    total = 0
    for b, n in enumerate(lengths):
        inp = x[b, :n].double()
        hn, cn = [], []
        for k in range(lstm.num_layers):
            outs = []
            for j in range(d):
                h, c = torch.zeros(1, H, dtype=torch.float64), torch.zeros(1, H, dtype=torch.float64)
                hs = [None] * n
                for t in reversed(range(n)) if j else range(n):
                    h, c = cells[(k, j)](inp[t : t + 1], (h, c))
                    h.retain_grad()
                    hs[t] = h
                seqs[(k, j)].append(hs)
                outs.append(torch.cat(hs))
                hn.append(h[0])
                cn.append(c[0])
            inp = torch.cat(outs, dim=1)
        total = total + sum(case_losses(case, inp, torch.stack(hn), torch.stack(cn), list(lengths), extra, b=b))
    total.backward()
    curves = {}
    for key, per_seq in seqs.items():
        sq = [0.0] * max(lengths)
        for hs in per_seq:
            for t, h in enumerate(hs):
                sq[t] += h.grad.pow(2).sum().item() if h.grad is not None else 0.0
        curves[key] = [math.sqrt(v) for v in sq]
    return curves


def assert_curve(got, want, key):
    assert len(got) == len(want), key
    scale = max(want)
    for t, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6 * scale), (key, t, got, want)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=k) for k, c in GTT_CASES.items()
    ],
)
def test_gradient_through_time_matches_unrolled_cell(case):
    d = 2 if case.bidir else 1
    b = 1 if case.unbatched else 4
    lstm = nn.LSTM(F, H, num_layers=case.layers, bidirectional=case.bidir, batch_first=case.batch_first)
    extra = (
        nn.Linear(d * H, 1),
        torch.randn(b, T, 1),
        torch.randn(case.layers * d, b, H),
        torch.randn(case.layers * d, b, H),
    )
    lengths = list(case.lengths) or [T] * b
    x = torch.randn(b, T, F)
    with lstmwatch.watch(lstm, log_every=1, sample=b, console=False) as w:
        if case.lengths:
            inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        elif case.unbatched:
            inp = x[0]
        else:
            inp = x if case.batch_first else x.transpose(0, 1)
        out, (hn, cn) = lstm(inp)
        if isinstance(out, PackedSequence):
            out = pad_packed_sequence(out, batch_first=True)[0]
        elif case.unbatched:
            out, hn, cn = out[None], hn[:, None], cn[:, None]
        elif not case.batch_first:
            out = out.transpose(0, 1)
        terms = case_losses(case, out, hn, cn, lengths, extra)
        for k, term in enumerate(terms):
            term.backward(retain_graph=k < len(terms) - 1)
        rec = w.step(sum(t.detach() for t in terms))
    ref = reference_curves(lstm, x, lengths, case, extra)
    last = case.layers - 1
    combined = [math.sqrt(sum(ref[(last, j)][t] ** 2 for j in range(d))) for t in range(T)]
    assert_curve(rec.curves["lstm/gtt"], combined, "lstm/gtt")
    for (k, j), curve in ref.items():
        key = f"lstm/l{k}" + ("_reverse" if j else "") + "/gtt"
        assert_curve(rec.curves[key], curve, key)
    if not case.bidir and not case.lengths:
        assert rec.stats["lstm/gtt/ratio"] == pytest.approx(combined[0] / combined[-1], rel=1e-4)
    if not case.bidir and case.loss in ("last_step", "h_n"):
        # All the gradient the loss puts in enters at the last step: the gain is the first-to-last ratio.
        assert rec.stats["lstm/gtt/gain"] == pytest.approx(combined[0] / combined[-1], rel=1e-4)


# --- input data


def test_data_stats_of_a_padded_tensor():
    x = 3 * torch.randn(6, 4, F) + 1.5  # (T, B, F)
    x[4:, 0] = 0  # two trailing zero steps in row 0
    x[5:, 2] = 0  # one in row 2
    x[2, 1] = 0  # an interior zero step is not padding
    model = Net()
    with lstmwatch.watch(model, log_every=1, sample=4, console=False) as w:
        loss = model(x)
        loss.backward()
        rec = w.step(loss)
    expected = {
        "mean": x.double().mean().item(),
        "std": x.double().std(unbiased=False).item(),
        "absmax": x.abs().max().item(),
        "pad_frac": 3 / 24,
    }
    assert_stats(rec.stats, {f"enc/data/{k}": v for k, v in expected.items()})


def test_data_stats_of_a_packed_sequence():
    lengths = [3, 6, 1, 4]
    x = 2 * torch.randn(4, 6, F) - 0.5
    valid = torch.cat([x[b, :n] for b, n in enumerate(lengths)])
    x[0, 3:] = 100.0  # beyond the length: never part of the data
    model = nn.LSTM(F, H)
    with lstmwatch.watch(model, log_every=1, sample=8, console=False) as w:
        out, _ = model(pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False))
        out.data.pow(2).sum().backward()
        rec = w.step(1.0)
    expected = {
        "mean": valid.double().mean().item(),
        "std": valid.double().std(unbiased=False).item(),
        "absmax": valid.abs().max().item(),
        "pad_frac": 0.0,
    }
    assert_stats(rec.stats, {f"lstm/data/{k}": v for k, v in expected.items()})


# --- gate statistics


@pytest.mark.parametrize("lengths", [None, (3, 6, 1, 4)], ids=["tensor", "packed"])
def test_gate_stats_match_direct_computation(lengths):
    model = nn.LSTM(F, H)
    x = 2 * torch.randn(4, 6, F)
    w_ih, w_hh = model.weight_ih_l0.detach().clone(), model.weight_hh_l0.detach().clone()
    bias = (model.bias_ih_l0 + model.bias_hh_l0).detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if lengths is None:
        lengths, inp = (6,) * 4, x.transpose(0, 1)
    else:
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    with lstmwatch.watch(model, log_every=1, sample=4, console=False) as w:
        out, _ = model(inp)
        (out.data if isinstance(out, PackedSequence) else out).pow(2).sum().backward()
        opt.step()  # the statistics are of the weights the forward ran with
        rec = w.step(1.0)
    gates = {g: [] for g in ("input", "forget", "cell", "output", "h")}
    for b, n in enumerate(lengths):
        h, c = torch.zeros(H), torch.zeros(H)
        for t in range(n):
            z = w_ih @ x[b, t] + w_hh @ h + bias
            i, f, g, o = (
                torch.sigmoid(z[:H]),
                torch.sigmoid(z[H : 2 * H]),
                torch.tanh(z[2 * H : 3 * H]),
                torch.sigmoid(z[3 * H :]),
            )
            c = f * c + i * g
            h = o * torch.tanh(c)
            for key, v in zip(gates, (i, f, g, o, h)):
                gates[key].append(v)
    gates = {k: torch.stack(v).double() for k, v in gates.items()}
    expected = {}
    for gate in ("input", "forget", "output"):
        v = gates[gate]
        expected |= {
            f"lstm/l0/{gate}/mean": v.mean().item(),
            f"lstm/l0/{gate}/sat_left": (v < 0.1).double().mean().item(),
            f"lstm/l0/{gate}/sat_right": (v > 0.9).double().mean().item(),
        }
    expected["lstm/l0/cell/mean"] = gates["cell"].mean().item()
    expected["lstm/l0/h/absmean"] = gates["h"].abs().mean().item()
    assert 0 < expected["lstm/l0/input/sat_right"] + expected["lstm/l0/forget/sat_left"]
    assert_stats(rec.stats, expected, rel=1e-5)


# --- non-finite values


def test_nan_input_is_dated_to_its_step():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lstmwatch.watch(model, log_every=4, console=False) as w:
        for step in range(1, 6):
            x = torch.randn(6, 4, F)
            if step == 3:
                x[2, 1, 0] = math.nan
            loss = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    recs = {r.step: r for r in w.records}
    assert sorted(recs) == [1, 2, 3, 4]  # the NaN brings a record forward to its step
    assert "enc/nonfinite/data" not in recs[2].stats
    for s in (3, 4):  # and the first non-finite step is kept
        assert recs[s].stats["enc/nonfinite/data"] == 3.0
        assert recs[s].stats["nonfinite_loss"] == 3.0


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "float"])
def test_nan_loss_is_dated_to_its_step(as_tensor):
    model = Net()
    with lstmwatch.watch(model, log_every=4, console=False) as w:
        for step in range(1, 6):
            loss = model(torch.randn(6, 4, F))
            if step == 3:
                loss = loss + torch.tensor(math.nan)  # the gradients stay finite
            loss.backward()
            w.step(loss if as_tensor else loss.item())
    recs = {r.step: r for r in w.records}
    assert "nonfinite_loss" not in recs[2].stats
    assert recs[3].stats["nonfinite_loss"] == recs[4].stats["nonfinite_loss"] == 3.0
    assert "enc/nonfinite/data" not in recs[4].stats
    assert all(math.isfinite(v) for k, v in recs[4].stats.items() if k.endswith("grad_norm"))
