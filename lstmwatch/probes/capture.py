"""What a logging step's forward keeps of an nn.LSTM or nn.GRU: a sample of its batch, and the output gradients.

A hook sees whatever the module's forward took and returned, and a subclass's forward or a user's hook may differ
from nn.LSTM's: `read_call` checks each part against nn.LSTM's signature and shapes, and leaves out what does not
fit. Only the sampled rows are gathered, so the cost is the sample's, whatever the batch. A packed batch stays in
its length-sorted order: restoring the caller's would read unsorted_indices back from the device. Rows, states
and gradients all follow that order. Nothing here reads a value back from the device, and nothing here is
recorded by autograd: tensors are detached before any op (torch.utils.checkpoint counts what a forward saves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..gates import SeqBatch
from ..schedule import Clock
from .base import unscale


def sample_rows(batch: int, clock: Clock) -> Tensor:
    """clock.sample rows of a batch of `batch`, sorted, on the host.

    Drawn with lstmwatch's own generator: the global RNG, and so training, is untouched.
    """
    return torch.randperm(batch, generator=clock.generator)[:min(clock.sample, batch)].sort().values


@dataclass(frozen=True)
class Rows:
    """The sampled rows of a batch, and how to take them out of the module's inputs, outputs and gradients."""

    index: Tensor  # (S,) sampled rows of the batch (length-sorted order if packed), on its device
    order: Tensor | None  # sorted_indices of a packed input: caller's rows in that order
    gather: tuple[Tensor, Tensor] | None  # packed: (S, T) where each sampled row's steps lie, and valid
    transposed: bool  # output is (T, B, ...)
    unbatched: bool

    def of_state(self, h: Tensor) -> Tensor:
        """The sampled rows of a state-shaped tensor (L * D, B, H), in the batch's order: (L * D, S, H)."""
        h = h.detach()
        h = h.unsqueeze(1) if self.unbatched else h
        if self.order is not None:
            h = h.index_select(1, self.order)
        return h[:, self.index]

    def of_out(self, out: Tensor) -> Tensor:
        """The sampled rows of an output-shaped tensor (its packed data, or padded), batch first: (S, T, D * P)."""
        out = out.detach()
        if self.gather is not None:  # packed data (N, X): the sampled rows' entries, zero past each row's end
            at, valid = self.gather
            return torch.where(valid[..., None], out[at], out.new_zeros(()))
        if self.unbatched:
            out = out.unsqueeze(0)
        elif self.transposed:
            out = out.transpose(0, 1)
        return out[self.index]


@dataclass
class Capture:
    """What a logging step's forward kept: a sample of the batch, and where its gradients come from."""

    rows: Rows
    batch: SeqBatch  # sampled rows, (S, T, F)
    state: tuple[Tensor, ...] | None  # sampled initial state(s), (L * D, S, H)
    top: Tensor | None  # (S, T, P) the module's output rows, when they are the top layer's hidden state
    grads: dict[str, Tensor] = field(default_factory=dict)  # 'out', 'h_n', 'c_n' -> sampled output gradients

    def add_grad(self, key: str, g: Tensor | None, scaler: Any = None) -> None:
        """Keep the sampled rows of an output's gradient, summed over backward passes; divided by the scale of
        the GradScaler whose scaled loss the backward started from, if any."""
        if g is None:  # this output does not reach the loss (e.g. only h_n is used)
            return
        g = self.rows.of_state(g) if key != "out" else self.rows.of_out(g)  # (L * D, S, H), (S, T, D * P)
        g = unscale(g, scaler)
        prev = self.grads.get(key)
        self.grads[key] = g if prev is None else prev + g


OnGrad = Callable[[Capture, str, "Tensor | None"], None]  # (capture, output key, its gradient)
Outputs = tuple[tuple[str, Tensor], ...]  # ('out', the output or a PackedSequence's data), ('h_n', h_n), ...


@dataclass(frozen=True)
class Call:
    """One forward call of an nn.LSTM or nn.GRU as its hook saw it, each part checked against nn.LSTM's own."""

    x: Tensor | PackedSequence  # (T, B, F) or (B, T, F), (T, F) unbatched, or packed; F the module's input_size
    batch: int  # B (1 unbatched)
    steps: int  # T
    unbatched: bool
    state: tuple[Tensor, ...] | None  # the initial states, each (L * D, B, width) or (L * D, width); None: zeros
    outputs: Outputs | None  # None: the output is not nn.LSTM's own (a subclass's, or changed by a user's hook)


def read_input(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | PackedSequence | None:
    """The input of a forward call read as nn.LSTM.forward(input, hx=None): a floating tensor (T, B, F), (B, T, F) or
    (T, F), or a PackedSequence, with F the module's input_size; None for anything else (a subclass's own
    arguments). Shapes and types only, and cheap: every forward reads it."""
    x = args[0] if args else kwargs.get("input")
    data = x.data if isinstance(x, PackedSequence) else x
    if not (isinstance(data, Tensor) and data.dim() in ((2,) if data is not x else (2, 3))
            and data.shape[-1] == module.input_size and data.is_floating_point()):
        return None
    return x


def read_call(module: nn.RNNBase, x: Tensor | PackedSequence, finals: tuple[str, ...], sizes: tuple[int, ...],
              args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call:
    """A forward call of input x (`read_input`) read as nn.LSTM.forward(input, hx=None) -> (output, (h_n, c_n)), or
    nn.GRU's with h_n. finals and sizes: the final states' names and widths (`Cell.finals`, `Cell.sizes`). An
    initial state of another shape counts as absent, an output of another shape as unknown.

    Reads shapes, types and a PackedSequence's batch_sizes (on the host) only, never a tensor's values.
    """
    unbatched = isinstance(x, Tensor) and x.dim() == 2
    if isinstance(x, PackedSequence):
        b, t_len = (int(x.batch_sizes[0]) if len(x.batch_sizes) else 0), len(x.batch_sizes)
    elif unbatched:
        b, t_len = 1, x.shape[0]
    else:
        b, t_len = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
    d = 2 if module.bidirectional else 1
    lead = (module.num_layers * d,) + (() if unbatched else (b,))
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    hx = (hx,) if isinstance(hx, Tensor) else tuple(hx) if isinstance(hx, (tuple, list)) else None
    return Call(x, b, t_len, unbatched, _shaped(hx, lead, sizes), _outputs(output, x, d, lead, finals, sizes))


def _shaped(ts: tuple[Any, ...] | None, lead: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[Tensor, ...] | None:
    """ts if it holds one tensor of shape (*lead, width) for each width of `sizes`, else None."""
    if ts is None or len(ts) != len(sizes):
        return None
    ok = all(isinstance(t, Tensor) and tuple(t.shape) == (*lead, w) for t, w in zip(ts, sizes))
    return ts if ok else None


def _outputs(output: Any, x: Tensor | PackedSequence, d: int, lead: tuple[int, ...], finals: tuple[str, ...],
             sizes: tuple[int, ...]) -> Outputs | None:
    """The outputs under their keys if `output` is what nn.LSTM (nn.GRU) returns for x, else None: a 2-tuple of the
    output, shaped as x with D * P features (packed if x is), and (h_n, c_n) (h_n alone for the GRU)."""
    if not (isinstance(output, tuple) and len(output) == 2):
        return None
    out, fin = output
    width = d * sizes[0]
    if isinstance(x, PackedSequence):
        if not (isinstance(out, PackedSequence) and tuple(out.data.shape) == (x.data.shape[0], width)):
            return None
        out = out.data
    elif not (isinstance(out, Tensor) and tuple(out.shape) == (*x.shape[:-1], width)):
        return None
    fins: tuple[Any, ...] | None = None
    if len(finals) == 1:
        fins = (fin,) if isinstance(fin, Tensor) else None
    else:
        fins = fin if isinstance(fin, tuple) else None
    states = _shaped(fins, lead, sizes)
    return None if states is None else (("out", out), *zip(finals, states))


def capture(module: nn.RNNBase, call: Call, clock: Clock, keep_top: bool, on_grad: OnGrad) -> Capture | None:
    """Sample a training forward's batch, its initial states and, if keep_top, its output; hook its outputs.

    call.outputs: ('out', the output tensor or a PackedSequence's data), ('h_n', h_n) and for the LSTM ('c_n',
    c_n), or None when unknown: then nothing is hooked and keep_top is ignored. on_grad is registered on each
    output that requires grad, to receive its gradient during backward. None for a batch without rows.
    """
    x = call.x
    if call.batch == 0:  # an empty batch: nothing to measure
        return None
    xd = x.data if isinstance(x, PackedSequence) else x  # (N, F) packed data, or the padded input
    rows = sample_rows(call.batch, clock)
    s = len(rows)
    index = rows.to(xd.device, non_blocking=True)
    gather = None
    if isinstance(x, PackedSequence):
        valid = rows[:, None] < x.batch_sizes[None, :]  # (S, T) on the host
        # Row r of step t lies at data[offset_t + r] while r < batch_sizes[t].
        offsets = torch.cumsum(x.batch_sizes, 0) - x.batch_sizes
        at = torch.where(valid, offsets[None, :] + rows[:, None], 0)
        gather = (at.to(xd.device, non_blocking=True), valid.to(xd.device, non_blocking=True))
        lengths = valid.sum(1)
    else:
        lengths = torch.full((s,), call.steps, dtype=torch.long)
    rs = Rows(index, x.sorted_indices if isinstance(x, PackedSequence) else None, gather, not module.batch_first,
              call.unbatched)
    data = rs.of_out(xd)  # (S, T, F)
    mask = gather[1] if gather is not None else torch.ones(s, call.steps, dtype=torch.bool, device=data.device)
    state = tuple(rs.of_state(h) for h in call.state) if call.state is not None else None
    outputs: Sequence[tuple[str, Tensor]] = call.outputs or ()
    top = rs.of_out(outputs[0][1]) if outputs and keep_top else None
    cap = Capture(rs, SeqBatch(data, mask, lengths, isinstance(x, PackedSequence), call.unbatched), state, top)
    for key, t in outputs:
        if t.requires_grad:
            t.register_hook(partial(on_grad, cap, key))
    return cap
