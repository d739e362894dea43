"""The reference path of the nn.LSTM / nn.GRU probes: what tests/test_fast.py holds the production path to.

It runs the step-by-step recurrence of `lstmwatch.gates` (the one behind `lstm_gates` / `gru_gates`, checked
against nn.LSTM and nn.GRU by test_gates.py), takes dL/dh_t from autograd through it, and computes the gate
statistics on its own, from the separate gate tensors. `use_reference(monkeypatch)` puts it in place of the
production recomputation (`RNNProbe._recompute`); everything around it (capture, keys, through-time
summaries) stays the probe's.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lstmwatch import keys
from lstmwatch.gates import GateTrace, GRUTrace, SeqBatch, Weights, gru_forward, lstm_forward
from lstmwatch.probes import RNNProbe
from lstmwatch.probes.capture import Capture
from lstmwatch.probes.rnn import Part
from lstmwatch.stats import HIGH, LOW

GateStats = dict[tuple[str, str], Tensor]


# --- gate statistics, from each gate's own (B, T, H) tensor and a mask


def masked_mean(x: Tensor, fm: Tensor) -> Tensor:
    """Mean of x (..., B, T, H) over the steps where fm (B, T, 1) is 1."""
    n = fm.sum() * x.shape[-1]
    return (x * fm).sum(dim=(-3, -2, -1)) / n.clamp_min(1)


def _sigmoid_gates(names: tuple[str, ...], gates: list[Tensor], fm: Tensor) -> GateStats:
    """Mean, left- and right-saturated fractions of each sigmoid gate (B, T, H)."""
    out: GateStats = {}
    for name, v in zip(names, gates):
        out[name, "mean"] = masked_mean(v, fm)
        out[name, "sat_left"] = masked_mean((v < LOW).to(fm.dtype), fm)
        out[name, "sat_right"] = masked_mean((v > HIGH).to(fm.dtype), fm)
    return out


def _tanh_sat(x: Tensor, fm: Tensor) -> Tensor:
    """Fraction of |x| > HIGH over valid steps."""
    return masked_mean((x.abs() > HIGH).to(fm.dtype), fm)


def lstm_stats(tr: GateTrace) -> GateStats:
    """Gate, cell and hidden statistics of one LSTM layer-direction."""
    fm = tr.mask[..., None].to(tr.i.dtype)
    out = _sigmoid_gates(("input", "forget", "output"), [tr.i, tr.f, tr.o], fm)
    out["cell", "mean"], out["cell", "sat"] = masked_mean(tr.g, fm), _tanh_sat(tr.g, fm)
    out["h", "sat"], out["h", "absmean"] = _tanh_sat(tr.h, fm), masked_mean(tr.h.abs(), fm)
    out["c", "sat"], out["c", "absmean"] = _tanh_sat(torch.tanh(tr.c), fm), masked_mean(tr.c.abs(), fm)
    out["c", "absmax"] = (tr.c.abs() * fm).amax()
    return out


def gru_stats(tr: GRUTrace) -> GateStats:
    """Gate and hidden statistics of one GRU layer-direction."""
    fm = tr.mask[..., None].to(tr.r.dtype)
    out = _sigmoid_gates(("reset", "update"), [tr.r, tr.z], fm)
    out["new", "mean"], out["new", "sat"] = masked_mean(tr.n, fm), _tanh_sat(tr.n, fm)
    out["h", "sat"], out["h", "absmean"] = _tanh_sat(tr.h, fm), masked_mean(tr.h.abs(), fm)
    return out


# --- the recomputation


def _forward(probe: RNNProbe, params: list[Weights], batch: SeqBatch, state: tuple[Tensor, ...] | None,
             keep_steps: bool) -> tuple[list[GateTrace] | list[GRUTrace], dict[str, Tensor], list[list[Tensor]]]:
    """The step-by-step recurrence: traces, final states by name, each layer-direction's per-step h."""
    m = probe.module
    if isinstance(m, nn.LSTM):
        h0, c0 = state if state is not None else (None, None)
        traces, hn, cn, steps = lstm_forward(params, m, batch, h0, c0, keep_steps)
        return traces, {"h_n": hn, "c_n": cn}, steps
    assert isinstance(m, nn.GRU)
    gtraces, hn, steps = gru_forward(params, m, batch, state[0] if state else None, keep_steps)
    return gtraces, {"h_n": hn}, steps


def _through_time(probe: RNNProbe, cap: Capture, traces: list, finals: dict[str, Tensor],
                  steps: list[list[Tensor]]) -> list[list[Tensor | None]]:
    """dL/dh_t for every layer, direction and step, by autograd from the output gradients backward caught."""
    d = 2 if probe.module.bidirectional else 1
    outs, gouts = [], []
    g_out = cap.grads.get("out")
    if g_out is not None:
        for j, gj in enumerate(g_out.chunk(d, dim=2)):
            outs.append(traces[len(traces) - d + j].h)
            gouts.append(gj.to(traces[0].h.dtype))
    for key, t in finals.items():
        g = cap.grads.get(key)
        if g is not None:
            outs.append(t)
            gouts.append(g.to(t.dtype))
    flat = [h for s in steps for h in s]
    got = torch.autograd.grad(outs, flat, gouts, allow_unused=True)
    t_len = len(steps[0])
    return [list(got[i * t_len:(i + 1) * t_len]) for i in range(len(steps))]


def reference_recompute(probe: RNNProbe, params: list[Weights], batch: SeqBatch, state: tuple[Tensor, ...] | None,
                        cap: Capture) -> list[Part]:
    """In place of RNNProbe._recompute: the step-by-step recurrence, and autograd through it for dL/dh_t."""
    want_grad = bool(cap.grads)
    with torch.enable_grad() if want_grad else torch.no_grad():
        if want_grad:
            batch = batch._replace(x=batch.x.requires_grad_())
        traces, finals, steps = _forward(probe, params, batch, state, want_grad)
        grads = _through_time(probe, cap, traces, finals, steps) if want_grad else None
    parts = []
    for idx, tr in enumerate(traces):
        g = None
        if grads is not None:
            zero = torch.zeros_like(tr.h[:, 0])
            g = torch.stack([gt if gt is not None else zero for gt in grads[idx]], 1)  # (S, T, H)
        st = lstm_stats(tr) if isinstance(tr, GateTrace) else gru_stats(tr)
        parts.append(Part(keys.layer_label(tr.layer, tr.direction == 1), st, tr.h, g, tr.mask, tr.direction == 1))
    return parts


def use_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every nn.LSTM / nn.GRU probe recompute through the reference path (undone with the monkeypatch)."""
    monkeypatch.setattr(RNNProbe, "_recompute", reference_recompute)
