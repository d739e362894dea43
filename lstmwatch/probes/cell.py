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
from .base import GATES_SITE, Probe, gate_items, gtt_items
from .capture import sample_rows


class CellProbe(Probe):
    """nn.LSTMCell or nn.GRUCell; subclasses name the kind and the recurrence (`cell`)."""

    max_calls = 10_000  # timesteps kept per logging step, to bound memory

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        super().__init__(name, module, clock)
        self._calls: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (x (S, F), h (S, H), c (S, H) or None)
        self._hgrads: list[Tensor | None] = []  # dL/dh_t (S, H) per call
        self._rows: Tensor | None = None  # (S,) the sampled rows, on the device
        self._batch = 0  # batch size of the step's first call, to notice a batch that changes size

    def _on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        self._mark_data(x)
        if not self.clock.logging or len(self._calls) >= self.max_calls:
            return
        unbatched = x.dim() == 1
        x = x.unsqueeze(0) if unbatched else x
        if self._rows is None:
            self._batch = x.shape[0]
            self._rows = sample_rows(self._batch, self.clock).to(x.device, non_blocking=True)
        if x.shape[0] != self._batch:  # the batch changed size between calls: stop capturing
            return
        hx = hx if isinstance(hx, tuple) or hx is None else (hx,)
        h_out = output[0] if isinstance(output, tuple) else output
        rows, hsize = self._rows, self.module.hidden_size
        state = [(s.unsqueeze(0) if unbatched else s)[rows].detach() for s in hx] if hx is not None else None
        zeros = x.new_zeros(len(rows), hsize)
        self._calls.append((x[rows].detach(), state[0] if state else zeros,
                            (state[1] if state else zeros) if isinstance(self.module, nn.LSTMCell) else None))
        self._hgrads.append(None)
        if h_out.requires_grad:
            h_out.register_hook(partial(self._on_h_grad, len(self._calls) - 1, unbatched))

    def _on_h_grad(self, t: int, unbatched: bool, g: Tensor) -> None:
        g = (g.unsqueeze(0) if unbatched else g)[self._rows].detach()
        prev = self._hgrads[t]
        self._hgrads[t] = g if prev is None else prev + g

    def end_step(self) -> None:
        """Forget what this step captured."""
        super().end_step()
        self._calls, self._hgrads, self._rows = [], [], None

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


class LSTMCellProbe(CellProbe):
    """nn.LSTMCell: gates i, f, g, o."""

    kind = "lstm_cell"
    cell = recurrence.LSTM


class GRUCellProbe(CellProbe):
    """nn.GRUCell: gates r, z, n."""

    kind = "gru_cell"
    cell = recurrence.GRU
