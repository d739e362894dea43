"""The production recurrence: what a logging step recomputes of an nn.LSTM, nn.GRU, nn.LSTMCell or nn.GRUCell.

The equations of the recurrences are written here once for the probes, with the fewest ops per timestep; the
step-by-step reference they are held to (tests/test_fast.py) is `lstmwatch.gates`, behind `lstm_gates` /
`gru_gates`. The same internals as that reference and the same dL/dh_t as autograd through it, for
every configuration (layers, directions, projections, packed sequences), since a loop over time is what a
logging step spends its time on. Each layer's hidden states come from the fused kernel (the top layer's from
the module's own output, when the caller has it); every gate of every step then comes from two matmuls (the
LSTM's cell state from one addcmul per step), and dL/dh_t from the backward recurrence written out, without an
autograd graph. The LSTM's loops run over time-major buffers, (T, S, ...), updated in place one contiguous
step at a time, and hand out (S, T, ...) views of them: per step of the backward, one small matmul (most of
its time) and four elementwise ops. A `Cell` holds what differs between the LSTM and the GRU; the loops over
layers and directions are shared. A cell module stepped by hand (nn.LSTMCell) gives every call's input and
incoming state, so its gates come from the same per-step gate computation (`Cell.step`) without a recurrence
to run.

Shapes: S sampled sequences, T steps (padded to the longest), H hidden, P output (proj_size or H), D directions,
G gates (4 for the LSTM, 3 for the GRU).
Sequences that end early run on through their padding: the recurrence is causal, so their valid steps are
exact, and the mask leaves the rest out. A reverse direction runs forward over each sequence reversed within
its own length (padding stays at the end), so valid steps come first in every direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

from . import stats
from .gates import Weights

GateStats = dict[tuple[str, str], Tensor]  # (gate or state, statistic) -> 0-d tensor


class Layer(NamedTuple):
    """The internals of one LSTM layer-direction, in the order the direction runs (valid steps first).

    From `_lstm_layer`, act, c and tc are (S, T, ...) views of time-major (T, S, ...) buffers.
    """

    act: Tensor  # (S, T, 4, H): i, f, g, o after their nonlinearity (sigmoid, sigmoid, tanh, sigmoid)
    c: Tensor  # (S, T, H) cell state after each step
    tc: Tensor  # (S, T, H) tanh(c)
    h: Tensor  # (S, T, P) hidden state after each step (projected when proj_size > 0)


class GRULayer(NamedTuple):
    """The internals of one GRU layer-direction, in the order the direction runs (valid steps first)."""

    act: Tensor  # (S, T, 3, H): r, z (sigmoid), n (tanh)
    ghn: Tensor  # (S, T, H) h_{t-1} W_hn + b_hn: what r scales inside n
    h_prev: Tensor  # (S, T, H) the state each step starts from
    h: Tensor  # (S, T, H)


class HasHidden(Protocol):
    """A layer-direction's internals: whatever else they hold, the hidden state after each step."""

    @property
    def h(self) -> Tensor: ...


L = TypeVar("L", bound=HasHidden)


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


State = tuple[Tensor, ...]  # a layer-direction's initial states: (h_0 (S, P), c_0 (S, H)) or (h_0 (S, H),)


@dataclass(frozen=True)
class Cell(Generic[L]):
    """What the shared loops need of one recurrence, and what a cell module's probe needs of it."""

    gates: tuple[str, ...]  # the gates in the order of the weights' row blocks
    finals: tuple[str, ...]  # the final states nn.Module returns: ('h_n', 'c_n') or ('h_n',)
    sizes: Callable[[nn.RNNBase], tuple[int, ...]]  # widths of those states: (P, H) for the LSTM, (H,) for the GRU
    kernel: Callable[[Weights, Tensor, State], Tensor]  # (p, x, state0) -> h (S, T, P): the fused kernel
    layer: Callable[[Weights, Tensor, Tensor, State], L]  # (p, x, h, state0): every gate from the kernel's h
    # (p, x, h_prev, c_prev or None): every step's internals from the state entering it, as a cell's calls give
    step: Callable[[Weights, Tensor, Tensor, Tensor | None], L]
    # (p, layer, e, ec, state0, full) -> dh (S, T, P), dgx (S, T, G * H)
    backward: Callable[[Weights, L, Tensor, Tensor | None, State | None, bool], tuple[Tensor, Tensor]]
    stats: Callable[[L, Tensor | None], GateStats]  # (layer, mask or None when every step is valid)


def _tanh_(x: Tensor) -> Tensor:
    """tanh in place as 2 sigmoid(2x) - 1: on CPUs the sigmoid is several times faster."""
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


def _flat(p: Weights) -> list[Tensor]:
    """The weights in the order the fused op takes them."""
    flat = [p["w_ih"], p["w_hh"]]
    if p["b_ih"] is not None and p["b_hh"] is not None:
        flat += [p["b_ih"], p["b_hh"]]
    return flat + ([p["w_hr"]] if p["w_hr"] is not None else [])


def _run_kernel(op: Callable[..., tuple[Tensor, ...]], mode: str, p: Weights, x: Tensor,
                hx: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """One layer-direction through the op the module's forward calls (no dropout, eval, batch first).

    mode: 'LSTM' or 'GRU', as cuDNN names it. On cuDNN, weights that are a step's snapshot (detached copies) are
    first laid out in one buffer, as flatten_parameters() does for a module's: cuDNN warns on every call with
    weights outside one. Python's warnings state is left alone.
    """
    flat = _flat(p)
    if x.is_cuda and torch.backends.cudnn.is_available() and torch.backends.cudnn.is_acceptable(x) \
            and torch._use_cudnn_rnn_flatten_weight() and not any(w.requires_grad for w in flat):
        from torch.backends.cudnn import rnn as cudnn_rnn

        hidden = p["w_hh"].shape[0] // (4 if mode == "LSTM" else 3)
        proj = p["w_hr"].shape[0] if p["w_hr"] is not None else 0
        try:
            with torch.no_grad():  # in place: the snapshot's tensors become views of one buffer, values unchanged
                torch._cudnn_rnn_flatten_weight(flat, len(flat), x.shape[-1], cudnn_rnn.get_cudnn_mode(mode),
                                                hidden, proj, 1, True, False)
        except RuntimeError:
            pass  # the weights stay as they are: the kernel compacts them itself (and cuDNN warns), values the same
    return op(x, hx, flat, p["b_ih"] is not None, 1, 0.0, False, False, True)[0]


def forward(cell: Cell[L], params: list[Weights], module: nn.RNNBase, x: Tensor, steps: Steps,
            state: tuple[Tensor, ...] | None = None, top: Tensor | None = None) -> list[L]:
    """Every layer-direction's internals for x (S, T, F), in h_n's order; not differentiable.

    state: the initial states as the module takes them, (L * D, S, *) each, zeros when None. top (S, T, D * P):
    the module's own output for these rows, when it is the top layer's hidden state: fewer kernel calls.
    """
    s = x.shape[0]
    d = 2 if module.bidirectional else 1
    sizes = cell.sizes(module)
    layers = []
    for k in range(module.num_layers):
        outs = []
        for j in range(d):
            idx = k * d + j
            p = params[idx]
            xin = steps.reverse(x) if j else x
            st0 = tuple(state[n][idx] if state is not None else x.new_zeros(s, w) for n, w in enumerate(sizes))
            if top is not None and k == module.num_layers - 1:
                h = top[..., j * sizes[0]:(j + 1) * sizes[0]]
                h = steps.reverse(h) if j else h
            else:
                h = cell.kernel(p, xin, st0)
            layers.append(cell.layer(p, xin, h, st0))
            outs.append(steps.reverse(h) if j else h)
        x = outs[0] if d == 1 else torch.cat(outs, 2)
    return layers


def backward(cell: Cell[L], params: list[Weights], layers: list[L], module: nn.RNNBase, steps: Steps,
             g_out: Tensor | None, g_finals: tuple[Tensor | None, ...] = (),
             state: tuple[Tensor, ...] | None = None) -> list[Tensor]:
    """dL/dh_t of every layer-direction and step, in real time: through the head and all later steps.

    g_out (S, T, D * P), g_finals: the gradients of h_n (and c_n), (L * D, S, *), that backward brought to the
    outputs. Returns per layer-direction (S, T, P); zero past each sequence's end, where e is zero.
    """
    d = 2 if module.bidirectional else 1
    top = layers[-1].h
    s, t_len, psize = top.shape
    ext: Tensor | None = g_out.to(top.dtype) if g_out is not None else top.new_zeros(s, t_len, d * psize)
    g_hn, g_cn = (tuple(g_finals) + (None, None))[:2]
    out: list[Tensor] = [top] * len(layers)
    for k in reversed(range(module.num_layers)):
        assert ext is not None  # what reaches layer k from above: the head's gradient, then each layer's
        below = None
        for j in range(d):
            idx = k * d + j
            e = ext[..., j * psize:(j + 1) * psize]
            e = steps.reverse(e) if j else e
            # h_n and c_n are the states after each sequence's last valid step.
            if g_hn is not None:
                e = _at_last(e, steps, g_hn[idx].to(e.dtype))
            ec = None
            if g_cn is not None:  # (S, T, H): c_n's gradient at each sequence's last step, zero elsewhere
                ec = _at_last(e.new_zeros(s, t_len, g_cn.shape[-1]), steps, g_cn[idx].to(e.dtype))
            st0 = tuple(t[idx] for t in state) if state is not None else None
            dh, dgx = cell.backward(params[idx], layers[idx], e, ec, st0, steps.last is None)
            out[idx] = steps.reverse(dh) if j else dh
            if k > 0:
                into = _matmul(dgx, params[idx]["w_ih"])  # (S, T, D * P) into the layer below
                into = steps.reverse(into) if j else into
                below = into if below is None else below + into
        ext = below
    return out


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    """x (S, T, K) @ w (K, N), without a copy of x when it is a view of a time-major (T, S, K) buffer."""
    xt = x.transpose(0, 1)
    return (xt @ w).transpose(0, 1) if xt.is_contiguous() else x @ w


def _at_last(e: Tensor, steps: Steps, g: Tensor) -> Tensor:
    """e (S, T, X) plus g (S, X) at each sequence's last valid step."""
    if steps.last is None:
        e = e.clone()
        e[:, -1] += g
        return e
    return e.scatter_add(1, steps.last[..., None].expand(-1, 1, e.shape[2]), g[:, None])


# --- the LSTM


def _lstm_kernel(p: Weights, x: Tensor, st0: State) -> Tensor:
    return _run_kernel(torch._VF.lstm, "LSTM", p, x, (st0[0][None], st0[1][None]))


def _lstm_gates(p: Weights, x: Tensor, h_prev: Tensor) -> Tensor:
    """i, f, g, o (A, B, 4, H) of every step at once from the input x (A, B, F) and the state entering each
    step h_prev (A, B, P): two matmuls, the nonlinearities in place. A layer passes (T, S): time-major."""
    s, t_len = x.shape[:2]
    hsize = p["w_hh"].shape[0] // 4
    z = (x.reshape(s * t_len, -1) @ p["w_ih"].T if p["b_ih"] is None or p["b_hh"] is None
         else torch.addmm(p["b_ih"] + p["b_hh"], x.reshape(s * t_len, -1), p["w_ih"].T))
    z.addmm_(h_prev.reshape(s * t_len, -1), p["w_hh"].T)
    act = z.view(s, t_len, 4, hsize)
    act[:, :, 2] *= 2
    act.sigmoid_()  # in place: a fresh buffer this size costs page faults on every logging step
    act[:, :, 2].mul_(2).sub_(1)  # tanh(x) = 2 sigmoid(2x) - 1
    return act


def _lstm_layer(p: Weights, x: Tensor, h: Tensor, st0: State) -> Layer:
    """Gates and cell states of every step from the layer's input x (S, T, F) and hidden states h (S, T, P).

    Computed time-major, (T, S, ...), and returned as (S, T, ...) views of it: each step of the cell-state
    recurrence here, and of the backward recurrence, is then one contiguous block, updated in place.
    """
    h_0, c_0 = st0
    h_prev = torch.cat([h_0[None], h.transpose(0, 1)[:-1]], 0)  # (T, S, P) the state each step starts from
    act = _lstm_gates(p, x.transpose(0, 1), h_prev)  # (T, S, 4, H)
    c = act[:, :, 0] * act[:, :, 2]  # (T, S, H): i g, then c_t = f_t c_{t-1} + i g in place, step by step
    cs, fs = c.unbind(0), act[:, :, 1].unbind(0)
    cs[0].addcmul_(fs[0], c_0)
    for t in range(1, len(cs)):
        cs[t].addcmul_(fs[t], cs[t - 1])
    return Layer(act.transpose(0, 1), c.transpose(0, 1), _tanh_(c.clone()).transpose(0, 1), h)


def _lstm_step(p: Weights, x: Tensor, h_prev: Tensor, c_prev: Tensor | None) -> Layer:
    """Every step's internals from its input x (S, T, F) and the states entering it, h_prev and c_prev (S, T, H)."""
    assert c_prev is not None, "an LSTM step needs the cell state entering it"
    act = _lstm_gates(p, x, h_prev)
    c = torch.addcmul(act[:, :, 0] * act[:, :, 2], act[:, :, 1], c_prev)  # f c_prev + i g
    tc = _tanh_(c.clone())
    return Layer(act, c, tc, act[:, :, 3] * tc)  # no projection: a cell's h is o tanh(c)


def _lstm_backward(p: Weights, layer: Layer, e: Tensor, ec: Tensor | None,
                   st0: State | None, full: bool) -> tuple[Tensor, Tensor]:
    """The LSTM's backward recurrence over one layer-direction, from the recomputed gates.

    e (S, T, P): dL/dh_t from outside the recurrence; ec (S, T, H): dL/dc_t from outside (c_n), or None.
      dh_t = e_t + dz_{t+1} W_hh;  dm_t = dh_t W_hr (with proj);  dc_t = dm_t o_t (1 - tanh^2 c_t) + dc_{t+1} f_{t+1};
      dz_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dm tanh(c) o(1-o)].
    Returns dh (S, T, P) and dz (S, T, 4H), views of time-major buffers filled in place: per step one addmm
    and four elementwise ops, no allocation. Past a sequence's end e and ec are zero, and so are dh, dz.
    """
    act, c, tc = layer.act.transpose(0, 1), layer.c.transpose(0, 1), layer.tc.transpose(0, 1)  # (T, S, ...)
    t_len, s, _, hsize = act.shape
    i, f, g, o = act.unbind(2)
    # dz_t = [dc, dc, dc, dm] * b_t: the slope of each gate times what multiplies it; b_t becomes dz_t in place.
    b = torch.addcmul(act, act, act, value=-1)  # (T, S, 4, H) sigmoid' = a - a^2, one pass
    torch.mul(g, g, out=b[:, :, 2]).neg_().add_(1)  # tanh'
    b[:, :, 0].mul_(g)
    b[1:, :, 1].mul_(c[:-1])
    if st0 is not None:
        b[0, :, 1].mul_(st0[1])
    else:
        b[0, :, 1].zero_()  # c_0 = 0
    b[:, :, 2].mul_(i)
    b[:, :, 3].mul_(tc)
    dz = b
    # (T, S, 1, H) o (1 - tanh^2 c), dc_t / dm_t within the step; becomes dL/dc_t in place, step by step, and
    # broadcasts over b's i, f, g.
    dc = torch.addcmul(o, o, tc * tc, value=-1)[:, :, None]
    dh = e.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # (T, S, P): e_t, then dh_t in place
    # Each step's blocks as views made once (unbind): indexing inside the loop costs more than the ops on them.
    dhs, dzs, dz_ifg, dz_o = dh.unbind(0), dz.view(t_len, s, 4 * hsize).unbind(0), dz[:, :, :3].unbind(0), \
        dz[:, :, 3].unbind(0)
    dcs, dc1s, fs = dc.view(t_len, s, hsize).unbind(0), dc.unbind(0), f.unbind(0)
    ecs = ec.transpose(0, 1).unbind(0) if ec is not None else None
    whh, whr = p["w_hh"], p["w_hr"]
    for t in range(t_len - 1, -1, -1):
        if t < t_len - 1:
            dhs[t].addmm_(dzs[t + 1], whh)
        dm = dhs[t] if whr is None else dhs[t] @ whr
        dcs[t].mul_(dm)
        if t < t_len - 1:
            dcs[t].addcmul_(dcs[t + 1], fs[t + 1])
        if ecs is not None and (not full or t == t_len - 1):
            dcs[t].add_(ecs[t])
        dz_ifg[t].mul_(dc1s[t])
        dz_o[t].mul_(dm)
    return dh.transpose(0, 1), dz.view(t_len, s, 4 * hsize).transpose(0, 1)


LSTM_GATES = ("input", "forget", "cell", "output")  # i, f, g, o: the row blocks of weight_ih and weight_hh


def _lstm_stats(layer: Layer, mask: Tensor | None = None) -> GateStats:
    """stats.gate_stats of one LSTM layer-direction, with its cell state."""
    return stats.gate_stats(layer.act, layer.h, mask, LSTM_GATES, tanh=2, cell=(layer.c, layer.tc))


# --- the GRU


def _gru_kernel(p: Weights, x: Tensor, st0: State) -> Tensor:
    return _run_kernel(torch._VF.gru, "GRU", p, x, st0[0][None])


def _gru_gates(p: Weights, x: Tensor, h_prev: Tensor) -> tuple[Tensor, Tensor]:
    """r, z, n (S, T, 3, H) of every step at once from the input x (S, T, F) and the state entering each step
    h_prev (S, T, H); and gh_n (S, T, H), h_prev W_hn + b_hn, which r scales inside n."""
    s, t_len, hsize = h_prev.shape
    gx = x.reshape(s * t_len, -1) @ p["w_ih"].T  # (S * T, 3H)
    gh = h_prev.reshape(s * t_len, -1) @ p["w_hh"].T
    if p["b_ih"] is not None and p["b_hh"] is not None:
        gx += p["b_ih"]
        gh += p["b_hh"]
    act, gh = gx.view(s, t_len, 3, hsize), gh.view(s, t_len, 3, hsize)  # act: gx, in place
    act[:, :, :2].add_(gh[:, :, :2]).sigmoid_()  # r, z
    act[:, :, 2] = _tanh_(torch.addcmul(act[:, :, 2], act[:, :, 0], gh[:, :, 2]))  # n = tanh(gx_n + r gh_n)
    return act, gh[:, :, 2]


def _gru_layer(p: Weights, x: Tensor, h: Tensor, st0: State) -> GRULayer:
    """r, z and n of every step from the layer's input x (S, T, F) and hidden states h (S, T, H)."""
    h_prev = torch.cat([st0[0][:, None], h[:, :-1]], 1)
    act, ghn = _gru_gates(p, x, h_prev)
    return GRULayer(act, ghn, h_prev, h)


def _gru_step(p: Weights, x: Tensor, h_prev: Tensor, c_prev: Tensor | None = None) -> GRULayer:
    """Every step's internals from its input x (S, T, F) and the state entering it h_prev (S, T, H)."""
    act, ghn = _gru_gates(p, x, h_prev)
    z, n = act[:, :, 1], act[:, :, 2]
    return GRULayer(act, ghn, h_prev, (1 - z) * n + z * h_prev)


def _gru_backward(p: Weights, layer: GRULayer, e: Tensor, ec: Tensor | None,
                  st0: State | None, full: bool) -> tuple[Tensor, Tensor]:
    """The GRU's backward recurrence over one layer-direction, from the recomputed gates.

    h_t = (1 - z) n + z h_{t-1};  n = tanh(gx_n + r gh_n);  gh = h_{t-1} W_hh + b_hh.
      dh_{t-1} = e_{t-1} + dh_t z_t + dgh_t W_hh;  dgh_t = [dh, dh, dh] * bh_t;  dgx_t = [dh, dh, dh] * bx_t,
      bx = [(1-z)(1-n^2) gh_n r(1-r), (h_{t-1} - n) z(1-z), (1-z)(1-n^2)], bh = bx with its n part times r.
    Returns dh (S, T, H) and dgx (S, T, 3H).
    """
    act, ghn, h_prev, _ = layer
    s, t_len, _, hsize = act.shape
    r, z, n = act.unbind(2)
    dn = (1 - z) * (1 - n * n)
    bx = torch.stack([dn * ghn * r * (1 - r), (h_prev - n) * z * (1 - z), dn], 2)  # (S, T, 3, H)
    bh = bx.clone()
    bh[:, :, 2] *= r
    bs, zs, es = bh.view(s, t_len, 3 * hsize).unbind(1), z.unbind(1), e.unbind(1)
    whh = p["w_hh"]
    dhs = [es[0]] * t_len
    dh = dgh = None
    for t in range(t_len - 1, -1, -1):
        if dh is None or dgh is None:
            dh = es[t]
        else:
            dh = torch.addmm(torch.addcmul(es[t], dh, zs[t + 1]), dgh, whh)
        dgh = torch.cat([dh, dh, dh], 1).mul_(bs[t])
        dhs[t] = dh
    dh_all = torch.stack(dhs, 1)
    return dh_all, (bx * dh_all[:, :, None]).view(s, t_len, 3 * hsize)


GRU_GATES = ("reset", "update", "new")  # r, z, n: the row blocks of weight_ih and weight_hh


def _gru_stats(layer: GRULayer, mask: Tensor | None = None) -> GateStats:
    """stats.gate_stats of one GRU layer-direction."""
    return stats.gate_stats(layer.act, layer.h, mask, GRU_GATES, tanh=2)


def _lstm_sizes(m: nn.RNNBase) -> tuple[int, ...]:
    return (m.proj_size or m.hidden_size, m.hidden_size)


def _gru_sizes(m: nn.RNNBase) -> tuple[int, ...]:
    return (m.hidden_size,)


LSTM: Cell[Layer] = Cell(LSTM_GATES, ("h_n", "c_n"), _lstm_sizes, _lstm_kernel, _lstm_layer, _lstm_step,
                         _lstm_backward, _lstm_stats)
GRU: Cell[GRULayer] = Cell(GRU_GATES, ("h_n",), _gru_sizes, _gru_kernel, _gru_layer, _gru_step, _gru_backward,
                           _gru_stats)
