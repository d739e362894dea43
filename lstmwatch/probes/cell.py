"""Probes of nn.LSTMCell and nn.GRUCell stepped by hand: each call of a step is one timestep of its sequence.

On a logging step every call keeps its sampled input and incoming state, and a tensor hook on its output
catches dL/dh_t: the total gradient of that timestep, through the head and every later call. `collect` then
computes the gates of every call at once with the production recurrence's per-step gates (`Cell.step`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .. import keys, recurrence, stats
from ..gates import weights
from ..schedule import Clock
from .base import DATA_SITE, GATES_SITE, Probe, gate_items, gtt_items, recomputing, scaler_of, unscale, wide
from .hooks import eager_only, overrides_forward


def _tiles(base: Tensor, views: list[Tensor]) -> bool:
    """Whether `views` cover `base` exactly: each one index of one of its dimensions (x[:, t], x[t]), all
    distinct, as many as that dimension's size. Shapes and offsets only, nothing on the device."""
    if not views or any(v.dim() != base.dim() - 1 or v.shape != views[0].shape for v in views):
        return False
    return len(views) * views[0].numel() == base.numel() and len({v.storage_offset() for v in views}) == len(views)


class CellProbe(Probe):
    """nn.LSTMCell or nn.GRUCell; subclasses name the kind and the recurrence (`cell`)."""

    module: nn.RNNCellBase
    kernel: type[nn.RNNCellBase]  # nn.LSTMCell or nn.GRUCell: the class whose forward is the standard cell
    max_calls = 10_000  # timesteps kept per logging step, to bound memory
    data_batch = 256  # inputs held for the NaN/Inf check before they are reduced

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        super().__init__(name, module, clock)
        self._custom = overrides_forward(module, self.kernel)  # a subclass computing a cell of its own
        self._custom_said = False
        # The step's calls' inputs, checked for NaN/Inf in one reduction per step (or per `data_batch` calls): a
        # cell runs once per timestep, and a reduction per call would cost more than the cell's own step.
        self._inputs: list[Tensor] = []
        self._data_base: Tensor | None = None  # the tensor this step's inputs are views of (`_mark_data`)
        self._base_views: list[Tensor] = []  # those views
        self._reentrant_said = False  # the note that a reentrant checkpoint hides the calls' order was made
        # Recomputed calls: the last one's h output, and whether a call's state was not it (a segment boundary).
        self._last_h: Tensor | None = None
        self._broken = False
        self._n_inputs = self._last_inputs = 0  # inputs noted in this step, in the previous one
        self._calls: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (x (S, F), h (S, H), c (S, H) or None)
        self._hgrads: list[Tensor | None] = []  # dL/dh_t (S, H) per call
        self._rows: slice | None = None  # the sampled rows: a window of the batch (a view per call, no copy)
        self._batch = 0  # batch size of the step's first call, to notice a batch that changes size
        self._recomputed = False  # whether the step's calls were captured inside a backward (reentrant checkpoint)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # A later call of a steady step, the common case (a cell runs once per timestep): the input kept for the
        # step's NaN/Inf check and the parameters compared by pointer, in a few microseconds; else the full path.
        try:
            if self._ran and not self.clock.logging and torch.is_grad_enabled() and self._bound():
                x = args[0] if args else kwargs.get("input")
                if isinstance(x, Tensor) and x.is_floating_point():
                    self._mark_data(x)
                return
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail("forward hook", exc)
            return
        super()._hook(module, args, kwargs, output)

    def _on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        m = self.module
        x = args[0] if args else kwargs.get("input")
        if not (isinstance(x, Tensor) and x.dim() in (1, 2) and x.shape[-1] == m.input_size
                and x.is_floating_point()):
            return  # not called as nn.LSTMCell.forward(input, hx=None) (a subclass's own arguments)
        self._mark_data(x)
        if not self.clock.logging or self._dropped or len(self._calls) >= self.max_calls:
            return
        # A call inside a backward pass is torch.utils.checkpoint recomputing the step's calls: captured only
        # if the step's own forward captured nothing (a reentrant checkpoint runs it without gradients).
        recomputed = recomputing()
        if self._calls and recomputed != self._recomputed:
            return
        unbatched = x.dim() == 1
        x = x.detach()
        x = x.unsqueeze(0) if unbatched else x
        if x.shape[0] == 0:  # an empty batch: nothing to measure
            return
        if self._rows is None:
            self._batch = x.shape[0]
            self._rows = sample_window(self._batch, self.clock)
        if x.shape[0] != self._batch:  # the batch changed size between calls: stop capturing
            return
        lstm = isinstance(m, nn.LSTMCell)
        shape = (m.hidden_size,) if unbatched else (self._batch, m.hidden_size)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        given = _shaped(hx, shape, 2 if lstm else 1)  # another shape counts as absent: zeros
        h_out = _shaped(output, shape, 2 if lstm else 1)  # the module's own output, or None
        rows = self._rows
        # Views of the call's tensors (autograd keeps them for its backward anyway), stacked at collect.
        state = [(s.detach().unsqueeze(0) if unbatched else s.detach())[rows] for s in given] if given else None
        if state is None:
            state = [x.new_zeros(rows.stop - rows.start, m.hidden_size)] * 2
        if recomputed and self._calls and (given is None or given[0] is not self._last_h):
            self._broken = True  # recomputed segment by segment: this call does not follow the one before
        self._last_h = h_out[0] if h_out is not None else None
        self._calls.append((x[rows], state[0], state[1] if lstm else None))
        self._hgrads.append(None)
        self._recomputed = recomputed
        if h_out is not None and h_out[0].requires_grad:
            h_out[0].register_hook(partial(self._on_h_grad, len(self._calls) - 1, unbatched))

    @eager_only  # a backward run inside a compiled function calls it eagerly: never compiled (hooks.py)
    def _on_h_grad(self, t: int, unbatched: bool, g: Tensor) -> None:
        try:
            if self._dropped or self._rows is None or t >= len(self._hgrads):  # dropped, or from an earlier step
                return
            g = unscale((g.detach().unsqueeze(0) if unbatched else g.detach())[self._rows], scaler_of(self.clock))
            prev = self._hgrads[t]
            self._hgrads[t] = g if prev is None else prev + g
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail("gradient hook of its output", exc)

    def _drop(self) -> None:
        super()._drop()
        self._calls, self._hgrads = [], []
        self._last_h, self._broken = None, False

    def _mark_data(self, x: Tensor) -> None:
        """Note a call's input for the step's NaN/Inf check, without a device operation.

        `cell(x[:, t], ...)` over t, the usual loop, passes views of one tensor: the step's first such view names
        that tensor (`_data_base`), summed once at the end of the step if the step's views of it cover all of it
        exactly (distinct slices of one index, as many as it has), else the views themselves are summed: a NaN
        in what the cell never reads (padding past a sequence's end, a column left out) is not the cell's.
        It qualifies when the previous step's calls together were at least half its size: never a whole
        dataset the batches are sliced from. Other inputs are kept by reference (autograd holds them anyway).
        """
        self._n_inputs += 1
        b = x._base
        if b is not None:
            if b is self._data_base:
                self._base_views.append(x)
                return
            if self._data_base is None and b.numel() <= 2 * x.numel() * self._last_inputs:
                self._data_base, self._base_views = b, [x]
                return
        self._inputs.append(x)
        if len(self._inputs) >= self.data_batch:  # a step of many calls, or step() never called: bound the refs
            self._reduce_data(final=False)

    def _reduce_data(self, final: bool = True) -> None:
        """Sum the inputs noted, with one reduction, into the step's data sum: a NaN or Inf anywhere makes it so.
        final: the step's end, its input tensor included."""
        xs, self._inputs = self._inputs, []
        parts = []
        if final and self._data_base is not None:
            base, views, self._data_base, self._base_views = self._data_base, self._base_views, None, []
            if _tiles(base, views):
                parts.append(base.detach().sum(dtype=wide(base.dtype)))
            else:
                xs = [v.detach() for v in views] + xs
        if xs:
            dtype = wide(xs[0].dtype)
            with torch.no_grad():
                if len(xs) > 1 and len({(t.shape, t.dtype, t.device) for t in xs}) == 1:
                    parts.append(torch.stack(xs).sum(dtype=dtype))  # (calls, *input).sum(): one copy, one sum
                else:
                    parts.extend(t.sum(dtype=dtype) for t in xs)
        if parts:
            dev = parts[0].device
            self._mark_sum(DATA_SITE, sum((t.to(dev) for t in parts[1:]), parts[0]))

    def date_sums(self) -> None:
        """As every probe's, with this step's inputs summed first."""
        self._reduce_data()
        super().date_sums()

    def collect(self, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """As every probe's, with this step's inputs summed first."""
        self._reduce_data()
        return super().collect(step)

    def end_step(self) -> None:
        """Forget what this step captured."""
        self._reduce_data()
        self._last_inputs, self._n_inputs = self._n_inputs, 0
        super().end_step()
        self._calls, self._hgrads, self._rows, self._recomputed = [], [], None, False
        self._last_h, self._broken = None, False

    def _internals(self, step: int) -> dict[str, Tensor]:
        """Gates of every captured call at once, with the weights of the forward; gradient through time."""
        if not self._calls or self._weights is None:
            return {}
        n, p = self.name, weights(self._forward_weights)
        dtype = p["w_ih"].dtype
        x = torch.stack([c[0] for c in self._calls], 1).to(dtype)  # (S, T, F)
        h = torch.stack([c[1] for c in self._calls], 1).to(dtype)  # (S, T, H) state entering each call
        cs = [c[2] for c in self._calls if c[2] is not None]
        c = torch.stack(cs, 1).to(dtype) if cs else None  # (S, T, H) the LSTM's cell state entering each call
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        # packed=True: one call is one timestep, so trailing zero steps say nothing about padding here.
        items = {keys.data_key(n, k): v for k, v in stats.data_stats(x, mask, packed=True).items()}
        lab = keys.layer_label(0)
        if self._custom:
            # A subclass with a forward of its own (a LayerNorm cell, say) computes what lstmwatch cannot know:
            # gates from the standard equations would be another cell's. Its gradients and inputs are measured.
            if not self._custom_said:
                self._custom_said = True
                self.notes.append(("custom", f"{n} is a {type(self.module).__name__}, a subclass of "
                                   f"{self.kernel.__name__} with a forward of its own: lstmwatch cannot know what "
                                   "it computes, so its gates and saturation are left out (gradient norms, the "
                                   "gradient through time, input statistics and the NaN/Inf watch go on)"))
        else:
            with torch.no_grad():
                layer = self.cell.step(p, x, h, c)
                items.update(gate_items(n, lab, self.cell.stats(layer, None)))  # None: every step valid
            self._mark(GATES_SITE, torch.isfinite(layer.h).all())
        unordered = self._recomputed and self._broken
        if unordered and not self._reentrant_said:
            # Calls recomputed by a reentrant checkpoint during backward come segment by segment, the last first
            # (one segment around the whole loop keeps its order: each call's state is the last one's output):
            # their order in time is unknown, and a gradient through time in the wrong order reads as growth.
            self._reentrant_said = True
            self.notes.append(("reentrant", f"{n}'s calls are recomputed by torch.utils.checkpoint(use_reentrant="
                               "True) during backward, last segment first, so their order in time is unknown: "
                               "its gradient through time is left out (gates, saturation and gradient norms go "
                               "on). `use_reentrant=False` keeps it"))
        if any(g is not None for g in self._hgrads) and not unordered:
            zero = torch.zeros_like(h)[:, 0]
            g = torch.stack([gt if gt is not None else zero for gt in self._hgrads], 1)  # (S, T, H)
            tt = stats.through_time(g, mask, reverse=False)
            items.update(gtt_items(n, None, tt))  # one layer: the module's is its own
            items.update(gtt_items(n, lab, tt))
        return items


def sample_window(batch: int, clock: Clock) -> slice:
    """clock.sample consecutive rows of a batch of `batch`, from a random start.

    A window and not scattered rows: each of a step's calls then keeps views, where gathering rows cost three
    device operations per call. Drawn with lstmwatch's own generator, so training's RNG is untouched.
    """
    n = min(clock.sample, batch)
    start = int(torch.randint(batch - n + 1, (), generator=clock.generator))
    return slice(start, start + n)


def _shaped(v: Any, shape: tuple[int, ...], n: int) -> tuple[Tensor, ...] | None:
    """v as n tensors of `shape`, if it is: a tensor (n 1), or a tuple or list of them (an LSTMCell's (h, c))."""
    ts = (v,) if isinstance(v, Tensor) else tuple(v) if isinstance(v, (tuple, list)) else ()
    ok = len(ts) == n and all(isinstance(t, Tensor) and tuple(t.shape) == shape for t in ts)
    return ts if ok else None


class LSTMCellProbe(CellProbe):
    """nn.LSTMCell: gates i, f, g, o."""

    kind = "lstm_cell"
    cell = recurrence.LSTM
    kernel = nn.LSTMCell


class GRUCellProbe(CellProbe):
    """nn.GRUCell: gates r, z, n."""

    kind = "gru_cell"
    cell = recurrence.GRU
    kernel = nn.GRUCell
