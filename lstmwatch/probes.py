"""Probes: one per watched module, chosen by module type. A probe owns its hooks and removes itself.

Hooks only keep references and launch device work; nothing here reads a value back.
On a logging step the forward hook keeps a sample of the batch, a snapshot of the weights
it ran with and tensor hooks on the outputs; `collect` then recomputes the gates and the
gradient through time for that sample and returns device tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import fast, stats
from .gates import SeqBatch, gru_forward, lstm_forward, rnn_params
from .schedule import Clock


@dataclass
class Capture:
    """What a logging step's forward kept: a sample of the batch, and where its gradients come from."""

    batch: SeqBatch | None  # sampled rows, (S, T, F)
    index: Tensor  # (S,) sampled rows of the batch (length-sorted order if packed), on its device
    state: tuple[Tensor, ...] | None  # sampled initial state(s), (L * D, S, H)
    grads: dict[str, Tensor]  # 'out', 'h_n', 'c_n' -> sampled output gradients, filled in backward
    batch_sizes: Tensor | None  # of a packed input: its output is padded in the same, length-sorted order
    order: Tensor | None  # sorted_indices of a packed input: caller's rows in that order
    transposed: bool  # output is (T, B, ...)
    unbatched: bool
    gather: tuple[Tensor, Tensor] | None = None  # packed: (S, T) where each sampled row's steps lie, and valid
    top: Tensor | None = None  # (S, T, P) the module's output rows, when they are the top layer's hidden state


class Part(NamedTuple):
    """What the recomputation gives for one layer-direction of the sample."""

    label: str  # 'l0', 'l1_reverse', ...
    stats: dict[str, Tensor]
    h: Tensor  # (S, T, P), checked for NaN/Inf
    grads: Tensor | None  # (S, T, P) dL/dh_t, None when no gradient reached the outputs
    mask: Tensor  # (S, T) bool
    reverse: bool


_LABEL = re.compile(r"_(l\d+(?:_reverse)?)(?:\.original\d*)?$")  # also parametrizations.weight_hh_l0.original0


class Probe:
    """Hooks on one module: gradient norms per parameter, layer and gate, the update ratio, non-finite sites.

    Subclasses add what their forward shows: `_on_forward` captures, `_internals` recomputes.
    """

    gates: tuple[str, ...] = ()
    kind = ""

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        self.name, self.module, self.clock = name, module, clock
        self.params = dict(module.named_parameters())
        self.labels = {p: self._label(p) for p in self.params}
        self._gsq: dict[str, Tensor] = {}  # param -> (blocks,) squared norms of its accumulated gradient
        self._first_bad: dict[str, Tensor] = {}  # site -> 0-d, +inf until a non-finite value appears
        self._weights: dict[str, Tensor] | None = None  # a logging step's parameters, before the optimizer step
        self._forward_weights: dict[str, Tensor] = {}  # the weights its forward read, by the names forward reads
        self.handles = [module.register_forward_hook(self._hook, with_kwargs=True)]
        for pname, p in self.params.items():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, pname)))

    def _weight_names(self) -> list[str]:
        """The names of the weights the module's forward reads."""
        m = self.module
        if isinstance(m, nn.RNNBase):
            return list(m._flat_weights_names)
        return [n for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if hasattr(m, n)]

    def _label(self, pname: str) -> str:
        """The layer-direction a parameter belongs to ('l0', 'l1_reverse')."""
        m = _LABEL.search(pname)
        return m.group(1) if m else "l0"

    def _blocks(self, pname: str) -> int:
        """How many gate blocks a parameter's rows hold."""
        return 1 if "_hr" in pname else len(self.gates)

    # --- configuration shown in run logs and reports
    def describe(self) -> dict:
        """The module's configuration, as plain values."""
        m = self.module
        conf = {"type": type(m).__name__, "parameters": sum(p.numel() for p in self.params.values())}
        for k in ("input_size", "hidden_size", "num_layers", "bidirectional", "batch_first", "bias", "dropout",
                  "proj_size"):
            if hasattr(m, k):
                conf[k] = getattr(m, k)
        return conf

    def remove(self) -> None:
        """Remove every hook this probe added; safe to call twice."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.end_step()

    # --- hooks
    def _mark(self, site: str, finite: Tensor) -> None:
        first = self._first_bad.get(site)
        if first is None:
            first = torch.full((), math.inf, device=finite.device)
        self._first_bad[site] = stats.first_nonfinite(first, finite, self.clock.step)

    def _hook(self, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled():  # an evaluation pass, not the training step
            return
        if self.clock.logging and self._weights is None:
            self._weights = {n: p.detach().clone() for n, p in self.params.items()}
            self._forward_weights = self._weights
            if parametrize.is_parametrized(module):  # weight_norm and the like: forward reads computed weights
                self._forward_weights = {n: getattr(module, n).detach().clone() for n in self._weight_names()
                                         if getattr(module, n, None) is not None}
        self._on_forward(args, kwargs, output)

    def _on_forward(self, args, kwargs, output) -> None:
        """Keep what a training forward shows (subclasses)."""

    def _on_grad(self, pname: str, p: Tensor) -> None:
        if p.grad is None:
            return
        scaler = self.clock.scaler
        scaled = scaler is not None and getattr(scaler, "_scale", None) is not None and scaler.is_enabled()
        if not self.clock.logging:
            # Outside logging steps only watch for NaN/Inf, with one reduction (the scaler's Infs are its own).
            if not scaled:
                self._mark("grad/" + pname, torch.isfinite(p.grad.detach().sum(dtype=torch.float32)))
            return
        sq = stats.sumsq_blocks(p.grad, self._blocks(pname))
        if scaled:
            # Hooks run before unscale_: divide by the scale this backward used. An Inf here is the
            # scaler's business (it skips the step and lowers the scale), not a fault.
            # NaN marks the statistic unknown for this step, so detectors pass over it.
            scale2 = scaler._scale.to(sq.device).float().pow(2)
            self._gsq[pname] = torch.where(torch.isfinite(sq), sq / scale2, torch.nan)
            return
        self._gsq[pname] = sq
        self._mark("grad/" + pname, torch.isfinite(sq.sum()))

    def adopt_scaler(self, scaler) -> None:
        """A GradScaler found after this step's backward: unscale what the hooks kept, forget its Infs."""
        scale2 = scaler._scale.float().pow(2)
        self._gsq = {k: torch.where(torch.isfinite(v), v / scale2.to(v.device), torch.nan)
                     for k, v in self._gsq.items()}
        self._first_bad = {k: v for k, v in self._first_bad.items() if not k.startswith("grad/")}

    # --- the logging step
    def end_step(self) -> None:
        """Forget what this step captured."""
        self._gsq = {}
        self._weights, self._forward_weights = None, {}

    def collect(self, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Device statistics of this step, and the few values the host already knows.

        A record forced between logging steps (a validation loss) has no gradient statistics: the
        hooks only watched for NaN/Inf during its backward.
        """
        items: dict[str, Tensor] = {}
        host: dict[str, float] = {}
        if self.clock.logging:
            items, host = self._grad_stats()
        if self._weights is not None:
            items.update(self._update_ratio(self._weights))
            items.update(self._internals(step))
        for site, first in self._first_bad.items():
            items[f"{self.name}/nonfinite/{site}"] = first
        return items, host

    def _grad_stats(self) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient norms per parameter, layer-direction and gate, from the block norms the hooks kept."""
        n, dev = self.name, next(iter(self.params.values())).device
        items: dict[str, Tensor] = {}
        trainable = sum(p.requires_grad for p in self.params.values())
        host = {f"{n}/grads_seen": len(self._gsq) / max(1, trainable), f"{n}/trainable": trainable / len(self.params)}
        zero = torch.zeros((), device=dev)
        layer_sq: dict[str, Tensor] = {}
        gate_sq: dict[str, Tensor] = {}
        for pname in self.params:
            sq = self._gsq.get(pname)
            if sq is None:
                continue
            items[f"{n}/{pname}/grad_norm"] = sq.sum().sqrt()
            lab = self.labels.get(pname, "other")
            layer_sq[lab] = layer_sq.get(lab, zero) + sq.sum()
            if sq.numel() == len(self.gates):
                gate_sq[lab] = gate_sq.get(lab, torch.zeros(len(self.gates), device=dev)) + sq
        items[f"{n}/grad_norm"] = sum(layer_sq.values(), zero).sqrt()
        for lab in sorted(set(self.labels.values())):
            items[f"{n}/{lab}/grad_norm"] = layer_sq.get(lab, zero).sqrt()
            gq = gate_sq.get(lab)
            for k, gate in enumerate(self.gates):
                items[f"{n}/{lab}/{gate}/grad_norm"] = gq[k].sqrt() if gq is not None else zero
        return items, host

    def _update_ratio(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """|w_after - w_before| / |w_before| per layer-direction: the optimizer's step, relative."""
        d2: dict[str, Tensor] = {}
        w2: dict[str, Tensor] = {}
        for pname, p in self.params.items():
            lab = self.labels[pname]
            before = weights[pname]
            d2[lab] = d2.get(lab, 0) + (p.detach() - before).float().pow(2).sum()
            w2[lab] = w2.get(lab, 0) + before.float().pow(2).sum()
        return {f"{self.name}/{lab}/update_ratio": (d2[lab] / w2[lab].clamp_min(1e-30)).sqrt() for lab in d2}

    def _internals(self, step: int) -> dict[str, Tensor]:
        """Statistics of what the forward showed (subclasses)."""
        return {}


class RNNProbe(Probe):
    """nn.LSTM or nn.GRU: the whole sequence in one call; subclasses name the gates and run the recurrence."""

    _cap: Capture | None = None

    def _on_forward(self, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        data = x.data if isinstance(x, PackedSequence) else x
        if data.is_floating_point():
            # One reduction: a NaN or Inf anywhere makes the sum non-finite.
            self._mark("data", torch.isfinite(data.sum(dtype=torch.float32)))
        if self.clock.logging and self._cap is None:
            self._cap = self._capture(x, hx, output)

    def _capture(self, x, hx, output) -> Capture:
        # Only the sampled rows are gathered, so the cost is the sample's, whatever the batch. A packed batch
        # stays in its length-sorted order: restoring the caller's would read unsorted_indices back from the
        # device. Rows, states and gradients all follow that order.
        packed = isinstance(x, PackedSequence)
        m = self.module
        unbatched = not packed and x.dim() == 2
        if packed:
            b, t_len = int(x.batch_sizes[0]), len(x.batch_sizes)  # batch_sizes lives on the host
        else:
            b, t_len = (x.unsqueeze(0) if unbatched else x if m.batch_first else x.transpose(0, 1)).shape[:2]
        s = min(self.clock.sample, b)
        # lstmwatch's own generator: the global RNG, and so training, is untouched.
        rows = torch.randperm(b, generator=self.clock.generator)[:s].sort().values
        index = rows.to(x.data.device if packed else x.device, non_blocking=True)
        gather = None
        if packed:
            valid = rows[:, None] < x.batch_sizes[None, :]  # (S, T) on the host
            # Row r of step t lies at data[offset_t + r] while r < batch_sizes[t].
            offsets = torch.cumsum(x.batch_sizes, 0) - x.batch_sizes
            at = torch.where(valid, offsets[None, :] + rows[:, None], 0)
            dev = x.data.device
            gather = (at.to(dev, non_blocking=True), valid.to(dev, non_blocking=True))
            lengths = valid.sum(1)
        else:
            lengths = torch.full((s,), t_len, dtype=torch.long)
        cap = Capture(None, index, None, {}, x.batch_sizes if packed else None, x.sorted_indices if packed else None,
                      not m.batch_first, unbatched, gather=gather)
        data = self._rows_of_out(cap, x.data if packed else x).detach()  # (S, T, F)
        mask = gather[1] if packed else torch.ones(s, t_len, dtype=torch.bool, device=data.device)
        cap.batch = SeqBatch(data, mask, lengths, packed, unbatched)
        if hx is not None:
            hx = hx if isinstance(hx, tuple) else (hx,)
            cap.state = tuple(self._rows_of_state(cap, h).detach() for h in hx)
        out, finals = self._split_output(output)
        if self._top_is_output(cap.batch, out.data if packed else out):
            cap.top = self._rows_of_out(cap, out.data if packed else out).detach()
        for key, t in (("out", out.data if packed else out), *finals):
            if t.requires_grad:
                t.register_hook(partial(self._on_out_grad, cap, key))
        return cap

    def _top_is_output(self, batch: SeqBatch, out: Tensor) -> bool:
        """Whether the output is the top layer's hidden state as the recomputation runs it: no dropout ran
        below it, and it is in the dtype the gates are recomputed in (not under autocast)."""
        m = self.module
        return (self._fast(batch) and (m.num_layers == 1 or m.dropout == 0 or not m.training)
                and out.dtype == m.weight_hh_l0.dtype)

    @staticmethod
    def _rows_of_state(cap: Capture, h: Tensor) -> Tensor:
        """The sampled rows of a state-shaped tensor (L * D, B, H), in the batch's order: (L * D, S, H)."""
        h = h.unsqueeze(1) if cap.unbatched else h
        if cap.order is not None:
            h = h.index_select(1, cap.order)
        return h[:, cap.index]

    @staticmethod
    def _rows_of_out(cap: Capture, out: Tensor) -> Tensor:
        """The sampled rows of an output-shaped tensor (its packed data, or padded), batch first: (S, T, D * P)."""
        if cap.gather is not None:  # packed data (N, X): the sampled rows' entries, zero past each row's end
            at, valid = cap.gather
            return torch.where(valid[..., None], out[at], out.new_zeros(()))
        if cap.unbatched:
            out = out.unsqueeze(0)
        elif cap.transposed:
            out = out.transpose(0, 1)
        return out[cap.index]

    def _on_out_grad(self, cap: Capture, key: str, g: Tensor | None) -> None:
        if g is None:  # this output does not reach the loss (e.g. only h_n is used)
            return
        g = self._rows_of_state(cap, g) if key != "out" else self._rows_of_out(cap, g)  # (L * D, S, H), (S, T, D * P)
        g = g.detach()
        prev = cap.grads.get(key)
        cap.grads[key] = g if prev is None else prev + g

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
        items: dict[str, Tensor] = {f"{n}/data/{k}": v for k, v in
                                    stats.data_stats(cap.batch.x, cap.batch.mask, cap.batch.packed).items()}
        dtype = next(iter(weights.values())).dtype
        batch = cap.batch._replace(x=cap.batch.x.to(dtype))
        state = tuple(s.to(dtype) for s in cap.state) if cap.state is not None else None
        params = rnn_params(m, weights)
        with torch.autocast(batch.x.device.type, enabled=False):
            if self._fast(batch):
                with torch.no_grad():
                    parts = self._fast_internals(params, batch, state, cap)
            else:
                parts = self._general_internals(params, batch, state, cap)
        finite = []
        for part in parts:
            for k, v in part.stats.items():
                items[f"{n}/{part.label}/{k}"] = v.detach()
            finite.append(torch.isfinite(part.h.detach()).all())
            if part.grads is not None:
                for k, v in stats.through_time(part.grads, part.mask, part.reverse).items():
                    items[f"{n}/{part.label}/{k}"] = v
        if parts[-1].grads is not None:
            top = parts[-(2 if m.bidirectional else 1):]  # the last layer's directions
            items[f"{n}/gtt"] = torch.stack([items[f"{n}/{p.label}/gtt"] for p in top]).pow(2).sum(0).sqrt()
            items[f"{n}/gtt/ratio"] = items[f"{n}/{top[0].label}/gtt/ratio"]
            items[f"{n}/gtt/decay"] = items[f"{n}/{top[0].label}/gtt/decay"]
            items[f"{n}/gtt/gain"] = self._gain(cap, items[f"{n}/{top[0].label}/gtt"][0], top[0])
        self._mark("gates", torch.stack(finite).all())
        return items

    def _gain(self, cap: Capture, first: Tensor, part: Part) -> Tensor:
        """|dL/dh| at the first step of the top layer's forward direction over all the gradient the loss put
        into that direction, step by step and at its final states: at most about 1 when gradients do not
        grow back through time, whatever the loss reads (for a loss on the last step, the first-to-last ratio).
        NaN when the loss puts nothing in."""
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

    def _general_internals(self, params, batch: SeqBatch, state, cap: Capture) -> list[Part]:
        """Any configuration: the step-by-step recurrence, and autograd through it for dL/dh_t."""
        want_grad = bool(cap.grads)
        with torch.enable_grad() if want_grad else torch.no_grad():
            if want_grad:
                batch = batch._replace(x=batch.x.requires_grad_())
            traces, finals, steps = self._forward(params, batch, state, want_grad)
            grads = self._through_time(cap, traces, finals, steps) if want_grad else None
        parts = []
        for idx, tr in enumerate(traces):
            g = None
            if grads is not None:
                zero = torch.zeros_like(tr.h[:, 0])
                g = torch.stack([gt if gt is not None else zero for gt in grads[idx]], 1)  # (S, T, H)
            parts.append(Part(f"l{tr.layer}" + ("_reverse" if tr.direction else ""), self._trace_stats(tr), tr.h,
                              g, tr.mask, tr.direction == 1))
        return parts

    def _fast(self, batch: SeqBatch) -> bool:
        """Whether the fast recomputation (lstmwatch.fast) runs, as it does for every configuration.

        The general one (the step-by-step recurrence of lstmwatch.gates, and autograd through it) is the
        reference tests/test_fast.py holds it to, and what a probe for another recurrence can start from.
        """
        return True

    def _fast_internals(self, params, batch: SeqBatch, state, cap: Capture) -> list[Part]:
        """The fused kernel per layer-direction, gates in a few matmuls, the backward recurrence written out."""
        m, cell = self.module, self.cell
        steps = fast.Steps.of(batch.mask, full=not batch.packed)
        layers = fast.forward(cell, params, m, batch.x, steps, state, top=cap.top)
        g = cap.grads
        grads = (fast.backward(cell, params, layers, m, steps, g.get("out"), tuple(g.get(k) for k in cell.finals),
                               state) if g else [None] * len(layers))
        d = 2 if m.bidirectional else 1
        mask = batch.mask if batch.packed else None
        return [Part(f"l{idx // d}" + ("_reverse" if idx % d else ""), cell.stats(ly, mask), ly.h, gr, batch.mask,
                     idx % d == 1) for idx, (ly, gr) in enumerate(zip(layers, grads))]

    def _through_time(self, cap: Capture, traces, finals, steps):
        """dL/dh_t for every layer, direction and step, from the output gradients backward caught."""
        d = 2 if self.module.bidirectional else 1
        outs, gouts = [], []
        g_out = cap.grads.get("out")
        if g_out is not None:
            for j, gj in enumerate(g_out.chunk(d, dim=2)):
                outs.append(traces[len(traces) - d + j].h)
                gouts.append(gj.to(traces[0].h.dtype))
        for key, t in finals.items():
            g = cap.grads.get(key)
            if g is not None:
                outs.append(t)
                gouts.append(g.to(t.dtype))
        flat = [h for s in steps for h in s]
        got = torch.autograd.grad(outs, flat, gouts, allow_unused=True)
        T = len(steps[0])
        return [list(got[i * T:(i + 1) * T]) for i in range(len(steps))]


class LSTMProbe(RNNProbe):
    """nn.LSTM: gates i, f, g, o."""

    gates = ("input", "forget", "cell", "output")
    kind = "lstm"
    cell = fast.LSTM

    def _split_output(self, output):
        out, (h_n, c_n) = output
        return out, (("h_n", h_n), ("c_n", c_n))

    def _forward(self, params, batch, state, keep_steps):
        h0, c0 = state if state is not None else (None, None)
        traces, hn, cn, steps = lstm_forward(params, self.module, batch, h0, c0, keep_steps)
        return traces, {"h_n": hn, "c_n": cn}, steps

    def _trace_stats(self, tr):
        return stats.gate_stats(tr.i, tr.f, tr.g, tr.o, tr.c, tr.h, tr.mask)


class GRUProbe(RNNProbe):
    """nn.GRU: gates r, z, n."""

    gates = ("reset", "update", "new")
    kind = "gru"
    cell = fast.GRU

    def _split_output(self, output):
        out, h_n = output
        return out, (("h_n", h_n),)

    def _forward(self, params, batch, state, keep_steps):
        traces, hn, steps = gru_forward(params, self.module, batch, state[0] if state else None, keep_steps)
        return traces, {"h_n": hn}, steps

    def _trace_stats(self, tr):
        return stats.gru_gate_stats(tr.r, tr.z, tr.n, tr.h, tr.mask)


class CellProbe(Probe):
    """nn.LSTMCell or nn.GRUCell stepped by hand: each call of a step is one timestep of its sequence.

    On a logging step every call keeps its sampled input and incoming state, and a tensor hook on its
    output catches dL/dh_t: the total gradient of that timestep, through the head and every later call.
    """

    max_calls = 10_000  # timesteps kept per logging step, to bound memory

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        super().__init__(name, module, clock)
        self._calls: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (x (S, F), h (S, H), c (S, H) or None)
        self._hgrads: list[Tensor | None] = []  # dL/dh_t (S, H) per call
        self._rows: Tensor | None = None
        self._batch = 0  # batch size of the step's first call, to notice a batch that changes size

    def _on_forward(self, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if x.is_floating_point():
            self._mark("data", torch.isfinite(x.sum(dtype=torch.float32)))
        if not self.clock.logging or len(self._calls) >= self.max_calls:
            return
        unbatched = x.dim() == 1
        x = x.unsqueeze(0) if unbatched else x
        if self._rows is None:
            self._batch = b = x.shape[0]
            rows = torch.randperm(b, generator=self.clock.generator)[:min(self.clock.sample, b)].sort().values
            self._rows = rows.to(x.device, non_blocking=True)
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
        n, w = self.name, self._forward_weights
        dtype = w["weight_ih"].dtype
        x = torch.stack([c[0] for c in self._calls], 1).to(dtype)  # (S, T, F)
        h = torch.stack([c[1] for c in self._calls], 1).to(dtype)  # (S, T, H) state entering each call
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        # packed=True: one call is one timestep, so trailing zero steps say nothing about padding here.
        items = {f"{n}/data/{k}": v for k, v in stats.data_stats(x, mask, packed=True).items()}
        with torch.no_grad():
            zx, zh = x @ w["weight_ih"].T, h @ w["weight_hh"].T  # (S, T, G * H)
            if "bias_ih" in w:
                zx, zh = zx + w["bias_ih"], zh + w["bias_hh"]
            if isinstance(self.module, nn.LSTMCell):
                c = torch.stack([c[2] for c in self._calls], 1).to(dtype)
                i, f, g, o = (zx + zh).chunk(4, dim=2)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c_new = f * c + i * g
                h_new = o * torch.tanh(c_new)
                st = stats.gate_stats(i, f, g, o, c_new, h_new, mask)
            else:
                xr, xz, xn = zx.chunk(3, dim=2)
                hr, hz, hn = zh.chunk(3, dim=2)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                nn_ = torch.tanh(xn + r * hn)
                h_new = (1 - z) * nn_ + z * h
                st = stats.gru_gate_stats(r, z, nn_, h_new, mask)
        items.update({f"{n}/l0/{k}": v for k, v in st.items()})
        self._mark("gates", torch.isfinite(h_new).all())
        if any(g is not None for g in self._hgrads):
            zero = torch.zeros_like(h)[:, 0]
            g = torch.stack([gt if gt is not None else zero for gt in self._hgrads], 1)  # (S, T, H)
            tt = stats.through_time(g, mask, reverse=False)
            items[f"{n}/gtt"] = tt["gtt"]
            for k in ("gtt/ratio", "gtt/decay"):
                items[f"{n}/{k}"] = items[f"{n}/l0/{k}"] = tt[k]
            items[f"{n}/l0/gtt"] = tt["gtt"]
        return items


class LSTMCellProbe(CellProbe):
    """nn.LSTMCell: gates i, f, g, o."""

    gates = ("input", "forget", "cell", "output")
    kind = "lstm_cell"


class GRUCellProbe(CellProbe):
    """nn.GRUCell: gates r, z, n."""

    gates = ("reset", "update", "new")
    kind = "gru_cell"


# Which probe watches which module type; the first match in order wins.
PROBES: dict[type[nn.Module], type[Probe]] = {
    nn.LSTM: LSTMProbe, nn.GRU: GRUProbe, nn.LSTMCell: LSTMCellProbe, nn.GRUCell: GRUCellProbe,
}


def probe_for(module: nn.Module) -> type[Probe] | None:
    """The probe class for a module, or None if lstmwatch does not watch its type."""
    for t, cls in PROBES.items():
        if isinstance(module, t):
            return cls
    return None
