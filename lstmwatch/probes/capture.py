"""What a logging step's forward keeps of an nn.LSTM or nn.GRU: a sample of its batch, and the output gradients.

Only the sampled rows are gathered, so the cost is the sample's, whatever the batch. A packed batch stays in
its length-sorted order: restoring the caller's would read unsorted_indices back from the device. Rows, states
and gradients all follow that order. Nothing here reads a value back from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..gates import SeqBatch
from ..schedule import Clock


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
        h = h.unsqueeze(1) if self.unbatched else h
        if self.order is not None:
            h = h.index_select(1, self.order)
        return h[:, self.index]

    def of_out(self, out: Tensor) -> Tensor:
        """The sampled rows of an output-shaped tensor (its packed data, or padded), batch first: (S, T, D * P)."""
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

    def add_grad(self, key: str, g: Tensor | None) -> None:
        """Keep the sampled rows of an output's gradient, summed over backward passes."""
        if g is None:  # this output does not reach the loss (e.g. only h_n is used)
            return
        g = self.rows.of_state(g) if key != "out" else self.rows.of_out(g)  # (L * D, S, H), (S, T, D * P)
        g = g.detach()
        prev = self.grads.get(key)
        self.grads[key] = g if prev is None else prev + g


OnGrad = Callable[[Capture, str, "Tensor | None"], None]  # (capture, output key, its gradient)


def capture(module: nn.RNNBase, x: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None,
            outputs: Sequence[tuple[str, Tensor]], clock: Clock, keep_top: bool, on_grad: OnGrad) -> Capture:
    """Sample a training forward's batch, its initial states and, if keep_top, its output; hook its outputs.

    outputs: ('out', the output tensor or a PackedSequence's data), ('h_n', h_n) and for the LSTM ('c_n', c_n).
    on_grad is registered on each output that requires grad, to receive its gradient during backward.
    """
    packed = isinstance(x, PackedSequence)
    xd = x.data if isinstance(x, PackedSequence) else x  # (N, F) packed data, or the padded input
    unbatched = not packed and xd.dim() == 2
    if isinstance(x, PackedSequence):
        b, t_len = int(x.batch_sizes[0]), len(x.batch_sizes)  # batch_sizes lives on the host
    else:
        b, t_len = (x.unsqueeze(0) if unbatched else x if module.batch_first else x.transpose(0, 1)).shape[:2]
    rows = sample_rows(b, clock)
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
        lengths = torch.full((s,), t_len, dtype=torch.long)
    rs = Rows(index, x.sorted_indices if isinstance(x, PackedSequence) else None, gather, not module.batch_first,
              unbatched)
    data = rs.of_out(xd).detach()  # (S, T, F)
    mask = gather[1] if gather is not None else torch.ones(s, t_len, dtype=torch.bool, device=data.device)
    state = None
    if hx is not None:
        state = tuple(rs.of_state(h).detach() for h in (hx if isinstance(hx, tuple) else (hx,)))
    out = dict(outputs)["out"]
    cap = Capture(rs, SeqBatch(data, mask, lengths, packed, unbatched), state,
                  rs.of_out(out).detach() if keep_top else None)
    for key, t in outputs:
        if t.requires_grad:
            t.register_hook(partial(on_grad, cap, key))
    return cap
