"""The logging step's fast path for nn.LSTM: unidirectional, on full-length sequences.

The same internals as `lstm_gates` and the same dL/dh_t as autograd through that recurrence, with the
fewest ops per timestep the recurrence allows, since a loop over time is what a logging step spends its
time on. Each layer's hidden states come from the fused kernel (the top layer's from the module's own
output, when the caller has it); every gate of every step then comes from two matmuls, the cell state
from one addcmul per step, and dL/dh_t from the LSTM's backward recurrence written out, without an
autograd graph. Every step is valid, so the statistics need no mask.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .stats import HIGH, LOW


class Layer(NamedTuple):
    """The internals of one layer on (S) sampled sequences of (T) steps."""

    act: Tensor  # (S, T, 4, H): i, f, g, o after their nonlinearity (sigmoid, sigmoid, tanh, sigmoid)
    c: Tensor  # (S, T, H) cell state after step t
    tc: Tensor  # (S, T, H) tanh(c)
    h: Tensor  # (S, T, P) hidden state after step t (projected when proj_size > 0)


def _kernel(p: dict[str, Tensor | None], x: Tensor, h0: Tensor, c0: Tensor) -> Tensor:
    """One layer through the op nn.LSTM.forward calls (no dropout, eval, unidirectional, batch first): (S, T, P)."""
    flat = [p["w_ih"], p["w_hh"]] + ([p["b_ih"], p["b_hh"]] if p["b_ih"] is not None else [])
    flat += [p["w_hr"]] if p["w_hr"] is not None else []
    with warnings.catch_warnings():
        # cuDNN warns that weights outside one flat buffer get compacted: these are the step's snapshot.
        warnings.simplefilter("ignore", UserWarning)
        return torch._VF.lstm(x, (h0[None], c0[None]), flat, p["b_ih"] is not None, 1, 0.0, False, False, True)[0]


def forward(params: list[dict[str, Tensor | None]], lstm: nn.LSTM, x: Tensor, h0: Tensor | None = None,
            c0: Tensor | None = None, top: Tensor | None = None) -> list[Layer]:
    """Every layer's gates, cell and hidden states for x (S, T, F); not differentiable.

    h0 (L, S, P), c0 (L, S, H): the initial state, zeros when None. top (S, T, P): the module's own output
    for these rows, when it is the top layer's hidden state (no dropout between layers): one kernel call fewer.
    """
    s, t_len = x.shape[:2]
    hsize, psize = lstm.hidden_size, lstm.proj_size or lstm.hidden_size
    layers = []
    for k in range(lstm.num_layers):
        p = params[k]
        h_0 = h0[k] if h0 is not None else x.new_zeros(s, psize)
        c_0 = c0[k] if c0 is not None else x.new_zeros(s, hsize)
        h = top if top is not None and k == lstm.num_layers - 1 else _kernel(p, x, h_0, c_0)
        h_prev = torch.cat([h_0[:, None], h[:, :-1]], 1)  # (S, T, P) the state each step starts from
        bias = p["b_ih"] + p["b_hh"] if p["b_ih"] is not None else None
        z = x.reshape(s * t_len, -1) @ p["w_ih"].T if bias is None else torch.addmm(
            bias, x.reshape(s * t_len, -1), p["w_ih"].T)
        z.addmm_(h_prev.reshape(s * t_len, -1), p["w_hh"].T)
        z = z.view(s, t_len, 4, hsize)
        z[:, :, 2] *= 2
        act = z.sigmoid_()  # in place: a fresh buffer this size costs page faults on every logging step
        act[:, :, 2].mul_(2).sub_(1)  # tanh(x) = 2 sigmoid(2x) - 1: the CPU's sigmoid is several times faster
        ig, fs = (act[:, :, 0] * act[:, :, 2]).unbind(1), act[:, :, 1].unbind(1)
        cs, cc = [], c_0
        for t in range(t_len):
            cc = torch.addcmul(ig[t], fs[t], cc)
            cs.append(cc)
        c = torch.stack(cs, 1)
        layers.append(Layer(act, c, (2 * c).sigmoid_().mul_(2).sub_(1), h))
        x = h
    return layers


def backward(params: list[dict[str, Tensor | None]], layers: list[Layer], g_out: Tensor | None,
             g_hn: Tensor | None = None, g_cn: Tensor | None = None, c0: Tensor | None = None) -> list[Tensor]:
    """dL/dh_t of every layer and step: the total derivative, through the head and all later steps.

    g_out (S, T, P), g_hn (L, S, P), g_cn (L, S, H): the gradients backward brought to the outputs.
    The LSTM's backward recurrence, from the recomputed gates:
      dh_t = e_t + dz_{t+1} W_hh;  dm_t = dh_t W_hr (with proj);  dc_t = dm_t o_t (1 - tanh^2 c_t) + dc_{t+1} f_{t+1};
      dz_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dm tanh(c) o(1-o)];  the layer below gets dz W_ih.
    Returns per layer (S, T, P).
    """
    s, t_len, _, hsize = layers[0].act.shape
    top = layers[-1].h
    ext = g_out.to(top.dtype) if g_out is not None else torch.zeros_like(top)  # (S, T, P) into the top layer
    out: list[Tensor] = [top] * len(layers)
    for k in reversed(range(len(layers))):
        act, c, tc, _ = layers[k]
        p = params[k]
        i, f, g, o = act.unbind(2)
        c_first = c0[k][:, None] if c0 is not None else c.new_zeros(s, 1, hsize)
        # dz_t = [dc, dc, dc, dm] * b_t: the slope of each gate times what multiplies it.
        b = torch.stack([g, torch.cat([c_first, c[:, :-1]], 1), i, tc], 2)
        slope = (1 - act).mul_(act)  # sigmoid'
        slope[:, :, 2] = 1 - g * g  # tanh'
        b = b.mul_(slope).view(s, t_len, 4 * hsize)
        a = (o * (1 - tc * tc)).unbind(1)
        fs, bs = f.unbind(1), b.unbind(1)
        e = list(ext.unbind(1))
        if g_hn is not None:
            e[-1] = e[-1] + g_hn[k].to(e[-1].dtype)
        whh, whr = p["w_hh"], p["w_hr"]
        dhs, dzs = [e[0]] * t_len, [bs[0]] * t_len
        dz = dc = None
        for t in range(t_len - 1, -1, -1):
            dh = e[t] if dz is None else torch.addmm(e[t], dz, whh)
            dm = dh if whr is None else dh @ whr
            if dc is None:
                dc = dm * a[t] if g_cn is None else torch.addcmul(g_cn[k].to(dm.dtype), dm, a[t])
            else:
                dc = torch.addcmul(dm * a[t], dc, fs[t + 1])
            dz = torch.cat([dc, dc, dc, dm], 1).mul_(bs[t])
            dhs[t], dzs[t] = dh, dz
        out[k] = torch.stack(dhs, 1)
        if k > 0:
            ext = torch.stack(dzs, 1) @ p["w_ih"]  # (S, T, P) into the layer below
    return out


def layer_stats(layer: Layer) -> dict[str, Tensor]:
    """stats.gate_stats of one layer, every step valid: a few passes over (S, T, 4, H)."""
    act, c, tc, h = layer
    n = act.shape[0] * act.shape[1] * act.shape[3]
    mean = act.mean((0, 1, 3))  # (4,)
    left = (act < LOW).sum((0, 1, 3)) / n
    right = (act > HIGH).sum((0, 1, 3)) / n
    out = {}
    for k, gate in ((0, "input"), (1, "forget"), (3, "output")):
        out[f"{gate}/mean"], out[f"{gate}/sat_left"], out[f"{gate}/sat_right"] = mean[k], left[k], right[k]
    out["cell/mean"] = mean[2]
    out["cell/sat"] = right[2] + (act[:, :, 2] < -HIGH).sum() / n
    out["c/sat"] = (tc.abs() > HIGH).sum() / n
    ca = c.abs()
    out["c/absmean"] = ca.mean()
    out["c/absmax"] = ca.amax()
    ha = h.abs()
    out["h/sat"] = (ha > HIGH).sum() / ha.numel()
    out["h/absmean"] = ha.mean()
    return out
