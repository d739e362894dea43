"""The logging step's recomputation of an nn.LSTM's internals, with the fewest ops per timestep.

The same internals as `lstm_gates` and the same dL/dh_t as autograd through that recurrence, for every
configuration (layers, directions, projections, packed sequences), since a loop over time is what a logging
step spends its time on. Each layer's hidden states come from the fused kernel (the top layer's from the
module's own output, when the caller has it); every gate of every step then comes from two matmuls, the cell
state from one addcmul per step, and dL/dh_t from the LSTM's backward recurrence written out, without an
autograd graph.

Shapes: S sampled sequences, T steps (padded to the longest), H hidden, P output (proj_size or H), D directions.
Sequences that end early run on through their padding: the recurrence is causal, so their valid steps are
exact, and the mask leaves the rest out. A reverse direction runs forward over each sequence reversed within
its own length (padding stays at the end), so valid steps come first in every direction.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .stats import HIGH, LOW


class Layer(NamedTuple):
    """The internals of one layer-direction, in the order the direction runs (valid steps first)."""

    act: Tensor  # (S, T, 4, H): i, f, g, o after their nonlinearity (sigmoid, sigmoid, tanh, sigmoid)
    c: Tensor  # (S, T, H) cell state after each step
    tc: Tensor  # (S, T, H) tanh(c)
    h: Tensor  # (S, T, P) hidden state after each step (projected when proj_size > 0)


class Steps(NamedTuple):
    """Where each sampled sequence's valid steps are; `full` when none ends early."""

    mask: Tensor  # (S, T) bool
    rev: Tensor | None  # (S, T) index reversing each sequence within its length; None when full (a flip)
    last: Tensor | None  # (S, 1) index of each sequence's last valid step; None when full (T - 1)

    @staticmethod
    def of(mask: Tensor, full: bool) -> Steps:
        """From the mask; full says, without reading the mask back, that every sequence has all T steps."""
        if full:
            return Steps(mask, None, None)
        n = mask.sum(1, keepdim=True)  # (S, 1) lengths, on the device
        t = torch.arange(mask.shape[1], device=mask.device)
        return Steps(mask, torch.where(t < n, n - 1 - t, t), (n - 1).clamp_min(0))

    def reverse(self, x: Tensor) -> Tensor:
        """x (S, T, *) with each sequence's valid steps reversed in place; its own inverse."""
        if self.rev is None:
            return x.flip(1)
        return x.gather(1, self.rev[..., None].expand(-1, -1, x.shape[2]))


def _kernel(p: dict[str, Tensor | None], x: Tensor, h0: Tensor, c0: Tensor) -> Tensor:
    """One layer-direction through the op nn.LSTM.forward calls (no dropout, eval, batch first): (S, T, P)."""
    flat = [p["w_ih"], p["w_hh"]] + ([p["b_ih"], p["b_hh"]] if p["b_ih"] is not None else [])
    flat += [p["w_hr"]] if p["w_hr"] is not None else []
    with warnings.catch_warnings():
        # cuDNN warns that weights outside one flat buffer get compacted: these are the step's snapshot.
        warnings.simplefilter("ignore", UserWarning)
        return torch._VF.lstm(x, (h0[None], c0[None]), flat, p["b_ih"] is not None, 1, 0.0, False, False, True)[0]


def forward(params: list[dict[str, Tensor | None]], lstm: nn.LSTM, x: Tensor, steps: Steps,
            h0: Tensor | None = None, c0: Tensor | None = None, top: Tensor | None = None) -> list[Layer]:
    """Every layer-direction's gates, cell and hidden states for x (S, T, F), in h_n's order; not differentiable.

    h0 (L * D, S, P), c0 (L * D, S, H): the initial state, zeros when None. top (S, T, D * P): the module's own
    output for these rows, when it is the top layer's hidden state (no dropout between layers): fewer kernel calls.
    """
    s, t_len = x.shape[:2]
    d = 2 if lstm.bidirectional else 1
    hsize, psize = lstm.hidden_size, lstm.proj_size or lstm.hidden_size
    layers = []
    for k in range(lstm.num_layers):
        outs = []
        for j in range(d):
            idx = k * d + j
            p = params[idx]
            xin = steps.reverse(x) if j else x
            h_0 = h0[idx] if h0 is not None else x.new_zeros(s, psize)
            c_0 = c0[idx] if c0 is not None else x.new_zeros(s, hsize)
            if top is not None and k == lstm.num_layers - 1:
                h = top[..., j * psize:(j + 1) * psize]
                h = steps.reverse(h) if j else h
            else:
                h = _kernel(p, xin, h_0, c_0)
            layers.append(_gates(p, xin, h, h_0, c_0, hsize))
            outs.append(steps.reverse(h) if j else h)
        x = outs[0] if d == 1 else torch.cat(outs, 2)
    return layers


def _gates(p: dict[str, Tensor | None], x: Tensor, h: Tensor, h_0: Tensor, c_0: Tensor, hsize: int) -> Layer:
    """Gates and cell states of every step from the layer's input x (S, T, F) and hidden states h (S, T, P)."""
    s, t_len = x.shape[:2]
    h_prev = torch.cat([h_0[:, None], h[:, :-1]], 1)  # (S, T, P) the state each step starts from
    z = (x.reshape(s * t_len, -1) @ p["w_ih"].T if p["b_ih"] is None
         else torch.addmm(p["b_ih"] + p["b_hh"], x.reshape(s * t_len, -1), p["w_ih"].T))
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
    return Layer(act, c, (2 * c).sigmoid_().mul_(2).sub_(1), h)


def backward(params: list[dict[str, Tensor | None]], layers: list[Layer], lstm: nn.LSTM, steps: Steps,
             g_out: Tensor | None, g_hn: Tensor | None = None, g_cn: Tensor | None = None,
             c0: Tensor | None = None) -> list[Tensor]:
    """dL/dh_t of every layer-direction and step, in real time: through the head and all later steps.

    g_out (S, T, D * P), g_hn (L * D, S, P), g_cn (L * D, S, H): the gradients backward brought to the outputs.
    Returns per layer-direction (S, T, P); zero past each sequence's end, where e is zero.
    """
    d = 2 if lstm.bidirectional else 1
    top = layers[-1].h
    s, t_len, psize = top.shape
    ext = g_out.to(top.dtype) if g_out is not None else top.new_zeros(s, t_len, d * psize)  # into the top layer
    out: list[Tensor] = [top] * len(layers)
    for k in reversed(range(lstm.num_layers)):
        below = None
        for j in range(d):
            idx = k * d + j
            e = ext[..., j * psize:(j + 1) * psize]
            e = steps.reverse(e) if j else e
            # h_n and c_n are the states after each sequence's last valid step.
            ec = None
            if g_hn is not None:
                e = _at_last(e, steps, g_hn[idx].to(e.dtype))
            if g_cn is not None:
                ec = _at_last(torch.zeros_like(layers[idx].c), steps, g_cn[idx].to(e.dtype))
            c_0 = c0[idx] if c0 is not None else None
            dh, dz = _backward_direction(params[idx], layers[idx], e, ec, c_0, full=steps.last is None)
            out[idx] = steps.reverse(dh) if j else dh
            if k > 0:
                into = dz @ params[idx]["w_ih"]  # (S, T, D * P) into the layer below
                into = steps.reverse(into) if j else into
                below = into if below is None else below + into
        ext = below
    return out


def _at_last(e: Tensor, steps: Steps, g: Tensor) -> Tensor:
    """e (S, T, X) plus g (S, X) at each sequence's last valid step."""
    if steps.last is None:
        e = e.clone()
        e[:, -1] += g
        return e
    return e.scatter_add(1, steps.last[..., None].expand(-1, 1, e.shape[2]), g[:, None])


def _backward_direction(p: dict[str, Tensor | None], layer: Layer, e: Tensor, ec: Tensor | None,
                        c_0: Tensor | None, full: bool) -> tuple[Tensor, Tensor]:
    """The LSTM's backward recurrence over one layer-direction, from the recomputed gates.

    e (S, T, P): dL/dh_t from outside the recurrence; ec (S, T, H): dL/dc_t from outside (c_n), or None.
      dh_t = e_t + dz_{t+1} W_hh;  dm_t = dh_t W_hr (with proj);  dc_t = dm_t o_t (1 - tanh^2 c_t) + dc_{t+1} f_{t+1};
      dz_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dm tanh(c) o(1-o)].
    Returns dh (S, T, P) and dz (S, T, 4H). Past a sequence's end e and ec are zero, and so are dh and dz.
    """
    act, c, tc, _ = layer
    s, t_len, _, hsize = act.shape
    i, f, g, o = act.unbind(2)
    c_first = c_0[:, None] if c_0 is not None else c.new_zeros(s, 1, hsize)
    # dz_t = [dc, dc, dc, dm] * b_t: the slope of each gate times what multiplies it.
    b = torch.stack([g, torch.cat([c_first, c[:, :-1]], 1), i, tc], 2)
    slope = (1 - act).mul_(act)  # sigmoid'
    slope[:, :, 2] = 1 - g * g  # tanh'
    b = b.mul_(slope).view(s, t_len, 4 * hsize)
    a = (o * (1 - tc * tc)).unbind(1)
    fs, bs, es = f.unbind(1), b.unbind(1), e.unbind(1)
    ecs = ec.unbind(1) if ec is not None else None
    whh, whr = p["w_hh"], p["w_hr"]
    dhs, dzs = [es[0]] * t_len, [bs[0]] * t_len
    dz = dc = None
    for t in range(t_len - 1, -1, -1):
        dh = es[t] if dz is None else torch.addmm(es[t], dz, whh)
        dm = dh if whr is None else dh @ whr
        if dc is None:
            dc = dm * a[t]
        else:
            dc = torch.addcmul(dm * a[t], dc, fs[t + 1])
        if ecs is not None and (not full or t == t_len - 1):
            dc = dc + ecs[t]
        dz = torch.cat([dc, dc, dc, dm], 1).mul_(bs[t])
        dhs[t], dzs[t] = dh, dz
    return torch.stack(dhs, 1), torch.stack(dzs, 1)


def layer_stats(layer: Layer, mask: Tensor | None = None) -> dict[str, Tensor]:
    """stats.gate_stats of one layer-direction: a few passes over (S, T, 4, H); mask (S, T) or None if all valid."""
    act, c, tc, h = layer
    if mask is None:
        n, nh = act.shape[0] * act.shape[1] * act.shape[3], h.numel()

        def total(x: Tensor, dims=None) -> Tensor:
            return x.sum(dims) if dims is not None else x.sum()  # a bool tensor sums to its count
    else:
        m = mask.to(act.dtype)
        n, nh = m.sum() * act.shape[3], m.sum() * h.shape[2]

        def total(x: Tensor, dims=None) -> Tensor:
            # Over valid steps only: x (S, T, ...) weighted by the mask.
            w = m.view(*m.shape, *([1] * (x.dim() - 2)))
            return (x * w).sum(dims) if dims is not None else (x * w).sum()

    dims = (0, 1, 3)
    mean = total(act, dims) / n  # (4,)
    left = total(act < LOW, dims) / n
    right = total(act > HIGH, dims) / n
    out = {}
    for k, gate in ((0, "input"), (1, "forget"), (3, "output")):
        out[f"{gate}/mean"], out[f"{gate}/sat_left"], out[f"{gate}/sat_right"] = mean[k], left[k], right[k]
    out["cell/mean"] = mean[2]
    out["cell/sat"] = right[2] + total(act[:, :, 2] < -HIGH) / n
    out["c/sat"] = total(tc.abs() > HIGH) / n
    ca, ha = c.abs(), h.abs()
    out["c/absmean"] = total(ca) / n
    out["c/absmax"] = ca.amax() if mask is None else (ca * mask[..., None]).amax()
    out["h/sat"] = total(ha > HIGH) / nh
    out["h/absmean"] = total(ha) / nh
    return out
