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
from .base import DATA_SITE, GATES_SITE, Probe, gate_items, gtt_items, recomputing
from .capture import sample_rows


class CellProbe(Probe):
    """nn.LSTMCell or nn.GRUCell; subclasses name the kind and the recurrence (`cell`)."""

    module: nn.RNNCellBase
    max_calls = 10_000  # timesteps kept per logging step, to bound memory

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        super().__init__(name, module, clock)
        # The step's calls' inputs summed on the device, dated once per step: a cell runs once per timestep,
        # and one reduction per call plus one check per step is what keeps its steady steps cheap.
        self._data_sum: Tensor | None = None
        self._calls: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (x (S, F), h (S, H), c (S, H) or None)
        self._hgrads: list[Tensor | None] = []  # dL/dh_t (S, H) per call
        self._rows: Tensor | None = None  # (S,) the sampled rows, on the device
        self._batch = 0  # batch size of the step's first call, to notice a batch that changes size
        self._recomputed = False  # whether the step's calls were captured inside a backward (reentrant checkpoint)

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
            self._rows = sample_rows(self._batch, self.clock).to(x.device, non_blocking=True)
        if x.shape[0] != self._batch:  # the batch changed size between calls: stop capturing
            return
        lstm = isinstance(m, nn.LSTMCell)
        shape = (m.hidden_size,) if unbatched else (self._batch, m.hidden_size)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        given = _shaped(hx, shape, 2 if lstm else 1)  # another shape counts as absent: zeros
        h_out = _shaped(output, shape, 2 if lstm else 1)  # the module's own output, or None
        rows = self._rows
        state = [(s.detach().unsqueeze(0) if unbatched else s.detach())[rows] for s in given] if given else None
        zeros = x.new_zeros(len(rows), m.hidden_size)
        self._calls.append((x[rows], state[0] if state else zeros, (state[1] if state else zeros) if lstm else None))
        self._hgrads.append(None)
        self._recomputed = recomputed
        if h_out is not None and h_out[0].requires_grad:
            h_out[0].register_hook(partial(self._on_h_grad, len(self._calls) - 1, unbatched))

    def _on_h_grad(self, t: int, unbatched: bool, g: Tensor) -> None:
        try:
            if self._dropped or self._rows is None or t >= len(self._hgrads):  # dropped, or from an earlier step
                return
            g = (g.detach().unsqueeze(0) if unbatched else g.detach())[self._rows]
            prev = self._hgrads[t]
            self._hgrads[t] = g if prev is None else prev + g
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail("gradient hook of its output", exc)

    def _drop(self) -> None:
        super()._drop()
        self._calls, self._hgrads = [], []

    def _mark_data(self, x: Tensor) -> None:
        """Add a call's input to the step's running sum: a NaN or Inf anywhere makes it non-finite."""
        if x.is_floating_point():
            s = x.detach().sum(dtype=torch.float32)
            self._data_sum = s if self._data_sum is None else self._data_sum.add_(s)

    def _date_data(self) -> None:
        """Date a NaN or Inf in this step's inputs, once for all its calls."""
        if self._data_sum is not None:
            self._mark(DATA_SITE, torch.isfinite(self._data_sum))
            self._data_sum = None

    def collect(self, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """As every probe's, with this step's inputs dated first."""
        self._date_data()
        return super().collect(step)

    def end_step(self) -> None:
        """Forget what this step captured."""
        self._date_data()
        super().end_step()
        self._calls, self._hgrads, self._rows, self._recomputed = [], [], None, False

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
        with torch.no_grad():
            layer = self.cell.step(p, x, h, c)
            # The mask, though all valid: fractions then come in the gates' dtype (float64 for a float64 cell).
            items.update(gate_items(n, lab, self.cell.stats(layer, mask)))
        self._mark(GATES_SITE, torch.isfinite(layer.h).all())
        if any(g is not None for g in self._hgrads):
            zero = torch.zeros_like(h)[:, 0]
            g = torch.stack([gt if gt is not None else zero for gt in self._hgrads], 1)  # (S, T, H)
            tt = stats.through_time(g, mask, reverse=False)
            items.update(gtt_items(n, None, tt))  # one layer: the module's is its own
            items.update(gtt_items(n, lab, tt))
        return items


def _shaped(v: Any, shape: tuple[int, ...], n: int) -> tuple[Tensor, ...] | None:
    """v as n tensors of `shape`, if it is: a tensor (n 1), or a tuple or list of them (an LSTMCell's (h, c))."""
    ts = (v,) if isinstance(v, Tensor) else tuple(v) if isinstance(v, (tuple, list)) else ()
    ok = len(ts) == n and all(isinstance(t, Tensor) and tuple(t.shape) == shape for t in ts)
    return ts if ok else None


class LSTMCellProbe(CellProbe):
    """nn.LSTMCell: gates i, f, g, o."""

    kind = "lstm_cell"
    cell = recurrence.LSTM


class GRUCellProbe(CellProbe):
    """nn.GRUCell: gates r, z, n."""

    kind = "gru_cell"
    cell = recurrence.GRU
