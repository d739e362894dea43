"""Recompute the gates that the fused kernels of nn.LSTM and nn.GRU hide: the reference recurrence.

Pure functions: no hooks, no state. The recurrences follow the equations in the
PyTorch documentation step by step, gate order (i, f, g, o) for the LSTM and (r, z, n) for
the GRU, and reproduce the modules' own outputs to rounding error. They are the reference: what
`lstm_gates` / `gru_gates` give users, and what tests/test_fast.py holds the probes' production
recurrence (`lstmwatch.recurrence`, the same internals in far fewer ops) to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .keys import layer_label

__all__ = ["GateTrace", "GRUTrace", "CellGates", "GRUCellGates", "lstm_gates", "gru_gates", "lstm_cell_gates",
           "gru_cell_gates"]


@dataclass(frozen=True)
class GateTrace:
    """The internals of one LSTM layer and direction, batch first, indexed by real time."""

    i: Tensor  # (B, T, H) input gate
    f: Tensor  # (B, T, H) forget gate
    g: Tensor  # (B, T, H) cell candidate (tanh)
    o: Tensor  # (B, T, H) output gate
    c: Tensor  # (B, T, H) cell state after step t
    h: Tensor  # (B, T, P or H) hidden state after step t (projected when proj_size > 0)
    mask: Tensor  # (B, T) bool, True on the valid steps
    layer: int
    direction: int  # 0 forward, 1 reverse


@dataclass(frozen=True)
class GRUTrace:
    """The internals of one GRU layer and direction, batch first, indexed by real time."""

    r: Tensor  # (B, T, H) reset gate
    z: Tensor  # (B, T, H) update gate
    n: Tensor  # (B, T, H) new-state candidate (tanh)
    h: Tensor  # (B, T, H)
    mask: Tensor  # (B, T) bool
    layer: int
    direction: int


class SeqBatch(NamedTuple):
    """An RNN input brought to one shape: x (B, T, F) batch first, mask (B, T), lengths (B,)."""

    x: Tensor
    mask: Tensor
    lengths: Tensor
    packed: bool
    unbatched: bool


def as_batch(module: nn.RNNBase, input: Tensor | PackedSequence, sorted_order: bool = False) -> SeqBatch:
    """Bring a module's input to (B, T, F), batch first, in the caller's batch order.

    sorted_order: leave a PackedSequence in its own (length-sorted) order, which needs no read of
    `unsorted_indices` from the device.
    """
    if isinstance(input, PackedSequence):
        if sorted_order:
            input = PackedSequence(input.data, input.batch_sizes)
        # pad_packed_sequence restores the caller's order (unsorted_indices) when it has them.
        x, lengths = pad_packed_sequence(input, batch_first=True)
        packed, unbatched = True, False
    else:
        unbatched = input.dim() == 2
        x = input.unsqueeze(0) if unbatched else (input if module.batch_first else input.transpose(0, 1))
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        packed = False
    # Built on the device: a host-built mask would be a blocking copy in the middle of a CUDA forward.
    t = torch.arange(x.shape[1], device=x.device)
    mask = t[None, :] < lengths.to(x.device, non_blocking=True)[:, None]
    return SeqBatch(x, mask, lengths, packed, unbatched)


def _state(module: nn.RNNBase, hx: Tensor | None, unbatched: bool) -> Tensor | None:
    """A state tensor (L * D, B, H) from what the caller passed, or None."""
    if hx is None:
        return None
    return hx.unsqueeze(1) if unbatched else hx


class Weights(TypedDict):
    """The weights of one layer-direction (or of a cell) by role; G gates, H hidden, P output, F input."""

    w_ih: Tensor  # (G * H, F)
    w_hh: Tensor  # (G * H, P)
    b_ih: Tensor | None  # (G * H,), None without bias
    b_hh: Tensor | None
    w_hr: Tensor | None  # (P, H) the LSTM's projection, None without


def weights(named: Mapping[str, Tensor], suffix: str = "") -> Weights:
    """One layer-direction's weights from a name -> tensor map: suffix '_l1_reverse', or '' for a cell."""
    return Weights(w_ih=named["weight_ih" + suffix], w_hh=named["weight_hh" + suffix],
                   b_ih=named.get("bias_ih" + suffix), b_hh=named.get("bias_hh" + suffix),
                   w_hr=named.get("weight_hr" + suffix))


def rnn_params(module: nn.RNNBase, named: Mapping[str, Tensor] | None = None) -> list[Weights]:
    """The weights of every (layer, direction) in h_n's order, from the module or a name -> tensor map.

    From the module: the weights as its forward reads them (a parametrization's computed weight, or a plain
    tensor a wrapper set before the call, as fastai's WeightDropout does), by the names nn.RNNBase gives them."""
    if named is None:
        named = {n: w for n in module._flat_weights_names if (w := getattr(module, n, None)) is not None}
    d = 2 if module.bidirectional else 1
    # The names nn.RNNBase gives its weights: weight_ih_l0, bias_hh_l1_reverse.
    return [weights(named, "_" + layer_label(k, j == 1)) for k in range(module.num_layers) for j in range(d)]


PerStep = list[Tensor]  # one (B, X) tensor per timestep, in real time


def _lstm_direction(p: Weights, x: Tensor, mask: Tensor | None, h: Tensor, c: Tensor,
                    reverse: bool) -> tuple[PerStep, PerStep, PerStep, PerStep, PerStep, PerStep, Tensor, Tensor]:
    """One direction of one layer; x (B, T, F), mask None when no sequence ends early.

    Returns the per-step tensors and the carried states. Few ops per step: the loop is what a
    logging step spends its time on.
    """
    hsize = p["w_hh"].shape[1] if p["w_hr"] is None else p["w_hr"].shape[1]
    xw = x @ p["w_ih"].T  # (B, T, 4H), all timesteps at once as the fused kernel does
    if p["b_ih"] is not None and p["b_hh"] is not None:
        xw = xw + (p["b_ih"] + p["b_hh"])
    whh, whr = p["w_hh"].T, (p["w_hr"].T if p["w_hr"] is not None else None)
    xs = xw.unbind(1)
    gi, gf, gg, go, cs, hs = ([h] * x.shape[1] for _ in range(6))  # every slot is filled below
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in steps:
        z = torch.addmm(xs[t], h, whh)  # (B, 4H)
        sg = torch.sigmoid(z)  # i, f and o from one call; g from its own tanh
        i, f, o = sg[:, :hsize], sg[:, hsize:2 * hsize], sg[:, 3 * hsize:]
        g = torch.tanh(z[:, 2 * hsize:3 * hsize])
        c_new = torch.addcmul(f * c, i, g)
        h_new = o * torch.tanh(c_new)
        if whr is not None:
            h_new = h_new @ whr
        if mask is None:
            c, h = c_new, h_new
        else:
            # A packed sequence that has ended keeps its state: what nn.LSTM returns in h_n.
            m = mask[:, t, None]
            c = torch.where(m, c_new, c)
            h = torch.where(m, h_new, h)
        gi[t], gf[t], gg[t], go[t], cs[t], hs[t] = i, f, g, o, c, h
    return gi, gf, gg, go, cs, hs, h, c


def lstm_forward(
    params: list[Weights],
    lstm: nn.LSTM,
    batch: SeqBatch,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    keep_steps: bool = False,
) -> tuple[list[GateTrace], Tensor, Tensor, list[PerStep]]:
    """The recurrence with given weights; returns (traces, h_n, c_n, per-step hidden states).

    h0, c0: (L * D, B, P or H) and (L * D, B, H). Differentiable: run it with grad enabled to
    take gradients through time. Between layers no dropout is applied (see lstm_gates).
    """
    x, mask = batch.x, batch.mask
    b, d = x.shape[0], 2 if lstm.bidirectional else 1
    hsize, out = lstm.hidden_size, lstm.proj_size or lstm.hidden_size
    # Only a PackedSequence has sequences shorter than T (known on the host, without reading the mask).
    ragged = mask if batch.packed else None
    fm = mask[..., None].to(x.dtype) if batch.packed else None
    traces: list[GateTrace] = []
    hn: list[Tensor] = []
    cn: list[Tensor] = []
    steps: list[PerStep] = []
    for k in range(lstm.num_layers):
        outs = []
        for j in range(d):
            idx = k * d + j
            h = h0[idx] if h0 is not None else x.new_zeros(b, out)
            c = c0[idx] if c0 is not None else x.new_zeros(b, hsize)
            gi, gf, gg, go, cs, hs, h, c = _lstm_direction(params[idx], x, ragged, h, c, reverse=j == 1)
            st = [torch.stack(s, 1) for s in (gi, gf, gg, go, cs, hs)]
            if fm is not None:
                st = [s * fm for s in st]
            i, f, g, o, c_t, h_t = st
            traces.append(GateTrace(i, f, g, o, c_t, h_t, mask=mask, layer=k, direction=j))
            outs.append(h_t)
            hn.append(h)
            cn.append(c)
            if keep_steps:
                steps.append(hs)
        x = torch.cat(outs, dim=2) if d == 2 else outs[0]
    return traces, torch.stack(hn), torch.stack(cn), steps


def lstm_gates(
    lstm: nn.LSTM, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
) -> list[GateTrace]:
    """Recompute i, f, g, o, c, h of every layer and direction of an nn.LSTM, in h_n's order.

    Traces are batch first whatever the module's batch_first, an unbatched input becomes batch 1,
    and a PackedSequence comes back padded in the caller's batch order with its mask. The result
    matches the module in eval mode, or in training mode with dropout=0. With dropout between
    layers in training mode the mask the kernel drew is unknowable: layer 0 is exact and deeper
    layers are recomputed from the undropped input, which is the dropout's expectation.
    Under autocast the recurrence runs in float32, so it is the exact version of what the
    low-precision kernel approximates.
    """
    if not isinstance(lstm, nn.LSTM):
        raise TypeError(f"lstm_gates needs an nn.LSTM, got {type(lstm).__name__}")
    batch = as_batch(lstm, input)
    h0 = c0 = None
    if hx is not None:
        h0, c0 = (_state(lstm, s, batch.unbatched) for s in hx)
    dev_type = batch.x.device.type
    with torch.no_grad(), torch.autocast(dev_type, enabled=False):
        params = rnn_params(lstm)
        dtype = params[0]["w_ih"].dtype
        batch = batch._replace(x=batch.x.to(dtype))
        h0 = h0.to(dtype) if h0 is not None else None
        c0 = c0.to(dtype) if c0 is not None else None
        traces, _, _, _ = lstm_forward(params, lstm, batch, h0, c0)
    return traces


def _gru_direction(p: Weights, x: Tensor, mask: Tensor, h: Tensor,
                   reverse: bool) -> tuple[PerStep, PerStep, PerStep, PerStep, Tensor]:
    """One direction of one GRU layer; x (B, T, F), mask (B, T)."""
    xw = x @ p["w_ih"].T  # (B, T, 3H)
    if p["b_ih"] is not None:
        xw = xw + p["b_ih"]
    rs, zs, ns, hs = ([h] * x.shape[1] for _ in range(4))  # every slot is filled below
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    for t in steps:
        hw = h @ p["w_hh"].T
        if p["b_hh"] is not None:
            hw = hw + p["b_hh"]
        xr, xz, xn = xw[:, t].chunk(3, dim=1)
        hr, hz, hn = hw.chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = torch.where(mask[:, t, None], (1 - z) * n + z * h, h)
        rs[t], zs[t], ns[t], hs[t] = r, z, n, h
    return rs, zs, ns, hs, h


def gru_forward(params: list[Weights], gru: nn.GRU, batch: SeqBatch, h0: Tensor | None = None,
                keep_steps: bool = False) -> tuple[list[GRUTrace], Tensor, list[PerStep]]:
    """The GRU recurrence with given weights; returns (traces, h_n, per-step hidden states)."""
    x, mask = batch.x, batch.mask
    b, d = x.shape[0], 2 if gru.bidirectional else 1
    fm = mask[..., None].to(x.dtype)
    traces: list[GRUTrace] = []
    hn: list[Tensor] = []
    steps: list[PerStep] = []
    for k in range(gru.num_layers):
        outs = []
        for j in range(d):
            idx = k * d + j
            h = h0[idx] if h0 is not None else x.new_zeros(b, gru.hidden_size)
            rs, zs, ns, hs, h = _gru_direction(params[idx], x, mask, h, reverse=j == 1)
            st = [torch.stack(s, 1) * fm for s in (rs, zs, ns, hs)]
            r, z, n, h_t = st
            traces.append(GRUTrace(r, z, n, h_t, mask=mask, layer=k, direction=j))
            outs.append(h_t)
            hn.append(h)
            if keep_steps:
                steps.append(hs)
        x = torch.cat(outs, dim=2) if d == 2 else outs[0]
    return traces, torch.stack(hn), steps


def gru_gates(gru: nn.GRU, input: Tensor | PackedSequence, hx: Tensor | None = None) -> list[GRUTrace]:
    """Recompute r, z, n, h of every layer and direction of an nn.GRU, in h_n's order."""
    if not isinstance(gru, nn.GRU):
        raise TypeError(f"gru_gates needs an nn.GRU, got {type(gru).__name__}")
    batch = as_batch(gru, input)
    h0 = _state(gru, hx, batch.unbatched)
    with torch.no_grad(), torch.autocast(batch.x.device.type, enabled=False):
        params = rnn_params(gru)
        dtype = params[0]["w_ih"].dtype
        batch = batch._replace(x=batch.x.to(dtype))
        traces, _, _ = gru_forward(params, gru, batch, h0.to(dtype) if h0 is not None else None)
    return traces


class CellGates(NamedTuple):
    """One step of an nn.LSTMCell: gates i, f, g, o and the new states c, h, each (B, H), or (H,) unbatched."""

    i: Tensor  # input gate
    f: Tensor  # forget gate
    g: Tensor  # cell candidate (tanh)
    o: Tensor  # output gate
    c: Tensor  # c', the cell's second output
    h: Tensor  # h', the cell's first output


class GRUCellGates(NamedTuple):
    """One step of an nn.GRUCell: gates r, z, n and the new state h, each (B, H), or (H,) unbatched."""

    r: Tensor  # reset gate
    z: Tensor  # update gate
    n: Tensor  # new-state candidate (tanh)
    h: Tensor  # h', the cell's output


def _cell_input(cell: nn.RNNCellBase, input: Tensor) -> tuple[Tensor, bool, Weights]:
    """The input as (B, F) in the weights' dtype, whether it was unbatched, and the cell's weights."""
    p = weights(dict(cell.named_parameters()))
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    return x.to(p["w_ih"].dtype), unbatched, p


def _cell_state(s: Tensor | None, x: Tensor, hidden: int, unbatched: bool) -> Tensor:
    """A cell state as (B, H) in x's dtype: zeros when not given."""
    if s is None:
        return x.new_zeros(x.shape[0], hidden)
    return (s.unsqueeze(0) if unbatched else s).to(x.dtype)


def _affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ w.T + b, without the bias when there is none."""
    return x @ w.T if b is None else torch.addmm(b, x, w.T)


def lstm_cell_gates(cell: nn.LSTMCell, input: Tensor, hx: Sequence[Tensor] | None = None) -> CellGates:
    """Recompute one step of an nn.LSTMCell, i, f, g, o, c', h', from its input (B, F) or (F,) and (h, c)."""
    if not isinstance(cell, nn.LSTMCell):
        raise TypeError(f"lstm_cell_gates needs an nn.LSTMCell, got {type(cell).__name__}")
    with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
        x, unbatched, p = _cell_input(cell, input)
        h0, c0 = (None, None) if hx is None else hx
        h = _cell_state(h0, x, cell.hidden_size, unbatched)
        c = _cell_state(c0, x, cell.hidden_size, unbatched)
        zi, zf, zg, zo = (_affine(x, p["w_ih"], p["b_ih"]) + _affine(h, p["w_hh"], p["b_hh"])).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
        c = f * c + i * g
        h = o * torch.tanh(c)
    out = CellGates(i, f, g, o, c, h)
    return CellGates(*(t.squeeze(0) for t in out)) if unbatched else out


def gru_cell_gates(cell: nn.GRUCell, input: Tensor, hx: Tensor | None = None) -> GRUCellGates:
    """Recompute one step of an nn.GRUCell, r, z, n, h', from its input (B, F) or (F,) and h."""
    if not isinstance(cell, nn.GRUCell):
        raise TypeError(f"gru_cell_gates needs an nn.GRUCell, got {type(cell).__name__}")
    with torch.no_grad(), torch.autocast(input.device.type, enabled=False):
        x, unbatched, p = _cell_input(cell, input)
        h = _cell_state(hx, x, cell.hidden_size, unbatched)
        xr, xz, xn = _affine(x, p["w_ih"], p["b_ih"]).chunk(3, dim=1)
        hr, hz, hn = _affine(h, p["w_hh"], p["b_hh"]).chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
    out = GRUCellGates(r, z, n, h)
    return GRUCellGates(*(t.squeeze(0) for t in out)) if unbatched else out
