"""Probes of nn.LSTM and nn.GRU: the whole sequence in one call, its internals recomputed on a logging step.

The forward hook keeps a sample of the batch and hooks the outputs (`capture`); `collect` recomputes the
sample's gates with the weights the forward ran with, and its gradient through time, through the production
recurrence (`lstmwatch.recurrence`).
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import keys, recurrence, stats
from ..gates import SeqBatch, Weights, rnn_params
from ..schedule import Clock
from .base import GATES_SITE, Probe, gate_items, gtt_items, scaler_of
from .capture import Capture, capture, read_call, read_input
from .hooks import KernelCallHook, eager_only, overrides_forward


class Part(NamedTuple):
    """What the recomputation gives for one layer-direction of the sample."""

    label: str  # 'l0', 'l1_reverse', ...
    stats: dict[tuple[str, str], Tensor]  # (gate or state, statistic) -> 0-d
    h: Tensor  # (S, T, P), checked for NaN/Inf
    grads: Tensor | None  # (S, T, P) dL/dh_t, None when no gradient reached the outputs
    mask: Tensor  # (S, T) bool
    reverse: bool


class RNNProbe(Probe):
    """nn.LSTM or nn.GRU; subclasses name the kind and the recurrence (`cell`)."""

    module: nn.RNNBase
    kernel: type[nn.RNNBase]  # nn.LSTM or nn.GRU: the class whose forward runs the recurrent kernel
    _cap: Capture | None = None
    _cap_training = False  # whether the capture is of a call in training mode
    _inner: threading.local | None = None  # set when the module's class has a forward of its own

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        super().__init__(name, module, clock)
        if overrides_forward(module, self.kernel):
            # A subclass's forward: watch the kernel's own call inside it (`super().forward(...)`), whose input,
            # hx and output are nn.LSTM's, rather than the outer call's arguments and return (hooks.py).
            self._inner = threading.local()
            self.handles.append(KernelCallHook(module, self.kernel, self._on_kernel_call))

    def _on_kernel_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """nn.LSTM.forward called from inside the module's own forward: what the kernel received and returned."""
        if self._inner is not None:
            self._inner.seen = True  # the outer call's hook then has nothing to add
        super()._hook(module, args, kwargs, output)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        inner = self._inner
        if inner is not None and getattr(inner, "seen", False):  # the kernel's own call was seen inside it
            inner.seen = False
            return
        super()._hook(module, args, kwargs, output)  # a plain nn.LSTM, or a forward that never reached the kernel

    def _on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x = read_input(self.module, args, kwargs)
        if x is None:  # not called with an input of this module (a subclass's own arguments)
            return
        self._mark_data(x.data if isinstance(x, PackedSequence) else x)
        # Once per step: a checkpoint's recomputation, or a second call, finds the capture made; but a call in
        # training mode replaces one in eval mode (a validation pass run with gradients on, before training).
        if self.clock.logging and not self._dropped and (
                self._cap is None or (self.module.training and not self._cap_training)):
            call = read_call(self.module, x, self.cell.finals, self.cell.sizes(self.module), args, kwargs, output)
            keep_top = call.outputs is not None and self._top_is_output(call.outputs[0][1])
            self._cap = capture(self.module, call, self.clock, keep_top, self._on_out_grad)
            self._cap_training = self.module.training

    def _top_is_output(self, out: Tensor) -> bool:
        """Whether the output is the top layer's hidden state as the recomputation runs it: no dropout ran
        below it, and it is in the dtype the gates are recomputed in (not under autocast)."""
        m = self.module
        # The snapshot's dtype: reading the module's weight would run a parametrization, inside autograd.
        w = self._forward_weights.get("weight_hh_l0")
        return w is not None and (m.num_layers == 1 or m.dropout == 0 or not m.training) and out.dtype == w.dtype

    @eager_only  # a backward run inside a compiled function calls it eagerly: never compiled (hooks.py)
    def _on_out_grad(self, cap: Capture, key: str, g: Tensor | None) -> None:
        # The output-gradient hook, a method of the probe so that benchmarks/overhead.py can time it per probe.
        try:
            if cap is self._cap:  # not a capture dropped after a failure
                cap.add_grad(key, g, scaler_of(self.clock))
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail(f"gradient hook of its output {key}", exc)

    def _drop(self) -> None:
        super()._drop()
        self._cap = None

    def end_step(self) -> None:
        """Forget what this step captured."""
        super().end_step()
        self._cap = None

    def _internals(self, step: int) -> dict[str, Tensor]:
        """Recompute the sample's gates with the weights it ran with, and its gradient through time."""
        cap, weights = self._cap, self._forward_weights
        if cap is None:
            return {}
        n, m = self.name, self.module
        items = {keys.data_key(n, k): v for k, v in
                 stats.data_stats(cap.batch.x, cap.batch.mask, cap.batch.packed).items()}
        dtype = next(iter(weights.values())).dtype
        batch = cap.batch._replace(x=cap.batch.x.to(dtype))
        state = tuple(s.to(dtype) for s in cap.state) if cap.state is not None else None
        with torch.autocast(batch.x.device.type, enabled=False):
            parts = self._recompute(rnn_params(m, weights), batch, state, cap)
        finite = []
        through: dict[str, stats.ThroughTime] = {}
        for part in parts:
            items.update(gate_items(n, part.label, part.stats))
            finite.append(torch.isfinite(part.h.detach()).all())
            if part.grads is not None:
                through[part.label] = tt = stats.through_time(part.grads, part.mask, part.reverse)
                items.update(gtt_items(n, part.label, tt))
        if parts[-1].grads is not None:
            top = parts[-(2 if m.bidirectional else 1):]  # the last layer's directions
            first = through[top[0].label]  # its forward direction's
            curve = torch.stack([through[p.label].curve for p in top]).pow(2).sum(0).sqrt()
            items.update(gtt_items(n, None, first._replace(curve=curve)))
            items[keys.gtt_key(n, None, "gain")] = self._gain(cap, first.curve[0], top[0])
        self._mark(GATES_SITE, torch.stack(finite).all())
        return items

    def _gain(self, cap: Capture, first: Tensor, part: Part) -> Tensor:
        """|dL/dh| at the first step of the top layer's forward direction over all the gradient the loss put
        into that direction, step by step and at its final states: at most about 1 when gradients do not
        grow back through time, whatever the loss reads (for a loss on the last step, the first-to-last ratio).
        NaN when the loss puts nothing in."""
        assert part.grads is not None
        psize = part.grads.shape[-1]
        put = first.new_zeros(())
        g_out = cap.grads.get("out")
        if g_out is not None:
            e = g_out[..., :psize].detach().to(first.dtype)  # (S, T, P) the forward direction's part
            put = put + (e.pow(2).sum(-1) * part.mask).sum(0).sqrt().sum()
        idx = (self.module.num_layers - 1) * (2 if self.module.bidirectional else 1)
        for key in self.cell.finals:  # h_n, c_n of that layer-direction
            g = cap.grads.get(key)
            if g is not None:
                put = put + g[idx].detach().to(first.dtype).pow(2).sum().sqrt()
        return torch.where(put > 0, first / put.clamp_min(1e-30), math.nan)

    def _recompute(self, params: list[Weights], batch: SeqBatch, state: tuple[Tensor, ...] | None,
                   cap: Capture) -> list[Part]:
        """Every layer-direction of the sample through the production recurrence, in h_n's order.

        The fused kernel per layer-direction, gates in a few matmuls, the backward recurrence written out;
        tests/test_fast.py replaces this method with the step-by-step reference and compares.
        """
        m, cell = self.module, self.cell
        d = 2 if m.bidirectional else 1
        mask = batch.mask if batch.packed else None  # None: every step valid, known without reading the mask
        with torch.no_grad():
            steps = recurrence.Steps.of(batch.mask, full=not batch.packed)
            layers = recurrence.forward(cell, params, m, batch.x, steps, state, top=cap.top)
            g = cap.grads
            grads: list[Tensor | None] = [None] * len(layers)
            if g:
                grads = list(recurrence.backward(cell, params, layers, m, steps, g.get("out"),
                                                 tuple(g.get(k) for k in cell.finals), state))
            return [Part(keys.layer_label(idx // d, idx % d == 1), cell.stats(ly, mask), ly.h, gr, batch.mask,
                         idx % d == 1) for idx, (ly, gr) in enumerate(zip(layers, grads))]


class LSTMProbe(RNNProbe):
    """nn.LSTM: gates i, f, g, o."""

    kind = "lstm"
    cell = recurrence.LSTM
    kernel = nn.LSTM


class GRUProbe(RNNProbe):
    """nn.GRU: gates r, z, n."""

    kind = "gru"
    cell = recurrence.GRU
    kernel = nn.GRU
