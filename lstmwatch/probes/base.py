"""The probe of one module: its hooks' lifecycle, gradient norms, the update ratio, where NaN/Inf appeared.

Hooks only keep references and launch device work; nothing here reads a value back. Nothing a hook raises
reaches the training loop: a failure is kept in `Probe.failures` for the Watcher to report, and what the probe
captured in that step is dropped (its NaN/Inf dates stay).
"""

from __future__ import annotations

import math
import operator
import os
import traceback
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .. import amp, keys, recurrence, stats
from ..interfaces import ModuleInfo
from ..schedule import Clock
from ..tape import Tape
from .hooks import ForwardHookHandle, KernelCallHook, eager_only

# What describe() reports of a module, when it has it.
_CONFIG = ("input_size", "hidden_size", "num_layers", "bidirectional", "batch_first", "bias", "dropout", "proj_size")

DATA_SITE, GATES_SITE = "data", "gates"  # non-finite sites of the input and of the recomputed gates (keys.SITES)
MAX_FAILURES = 8  # hook failures kept until the Watcher takes them; later ones are dropped
MAX_SITE_SETS = 16  # distinct sets of sites dated together (`Probe.date_sums`); beyond, each site on its own
IDLE_RECORDS = 3  # logging records in a row without a training forward before the probe says its module did not run


def grad_site(pname: str) -> str:
    """The non-finite site of a parameter's gradient: 'grad/weight_hh_l0'."""
    return f"grad/{pname}"


def recomputing() -> bool:
    """Whether a forward runs inside a backward pass, as torch.utils.checkpoint's recomputation does."""
    return torch._C._current_graph_task_id() != -1


def _failure(what: str, exc: Exception) -> tuple[str, Exception]:
    """(what failed and where in lstmwatch, the exception without tracebacks): their frames hold the forward's
    tensors, which must not outlive the step."""
    pkg = os.sep + "lstmwatch" + os.sep
    ours = [(f.f_code.co_filename, line) for f, line in traceback.walk_tb(exc.__traceback__)
            if pkg in f.f_code.co_filename]
    if ours:
        what = f"{what} ({ours[-1][0].rsplit(pkg, 1)[-1]}:{ours[-1][1]})"
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return what, exc


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a NaN/Inf check sums in: float32 at least, float64 kept (a float32 sum of large float64 values
    would overflow to Inf and read as a fault)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_scaled(scaler: Any) -> bool:
    """Whether a GradScaler is on and has scaled this step's gradients."""
    return scaler is not None and getattr(scaler, "_scale", None) is not None and scaler.is_enabled()


def scaler_of(clock: Clock) -> Any:
    """The GradScaler whose scale multiplies the gradients of the backward running now: the one passed to
    watch(), else the one whose scaled loss this backward started from (amp.py), else None."""
    if clock.scaler is not None:
        return clock.scaler
    found = amp.active()
    if found is not None:
        clock.found = found
    return found


def unscale(g: Tensor, scaler: Any) -> Tensor:
    """g as it would be without the GradScaler (when it is on): divided by its scale, on the device. An Inf or NaN
    of an overflowing scaled backward (the scaler skips that step) becomes NaN: unknown, not a fault."""
    if not is_scaled(scaler):
        return g
    return torch.where(torch.isfinite(g), g / scaler._scale.to(g.device).reshape(()), math.nan)


class Probe:
    """Hooks on one module: gradient norms per parameter, layer and gate, the update ratio, non-finite sites.

    Subclasses name the recurrence and add what their forward shows: `_on_forward` captures, `_internals`
    recomputes.
    """

    cell: recurrence.Cell[Any]  # the module's recurrence: its gates, final states and equations
    kind = ""  # 'lstm', 'gru', 'lstm_cell', 'gru_cell'
    _traced_said = False  # the note that torch.compile traced the module's forward was made (`_on_grad`)

    def __init__(self, name: str, module: nn.Module, clock: Clock):
        self.name, self.module, self.clock = name, module, clock
        self.params: dict[str, Tensor] = {}  # name -> the parameter hooked and measured (`_bind`)
        self.labels: dict[str, str] = {}
        self._own: tuple[Tensor | None, ...] = ()  # module._parameters' values when bound: a replacement differs
        self._trains: tuple[bool, ...] = ()  # their requires_grad when bound
        self._grad_handles: list[RemovableHandle] = []
        self._gsq: dict[str, Tensor] = {}  # param -> (blocks,) squared norms of its accumulated gradient
        self._first_bad: dict[str, Tensor] = {}  # site -> 0-d, +inf until a non-finite value appears
        # This step's sums per site (input, gradients), written together at its end as one row of a Tape: two
        # device operations per step whatever the number of sites, where dating each at once cost six per site.
        self._sums: dict[str, Tensor] = {}
        self._tapes: dict[tuple[str, ...], Tape] = {}  # sorted sites -> the tape of their sums
        self._weights: dict[str, Tensor] | None = None  # a logging step's parameters, before the optimizer step
        self._forward_weights: dict[str, Tensor] = {}  # the weights its forward read, by the names forward reads
        self._dropped = False  # a hook failed in this step: its statistics are dropped
        self._ran = False  # a training forward ran in this step
        self._seen = False  # a training forward ran since the last logging record
        self._idle = 0  # logging records in a row whose interval saw no training forward
        self._unhooked = 0  # logging records in a row with gradients but no training forward seen
        self._rebinds = 0  # the forwards of this step that found other parameters than those bound
        self._foreign = False  # a forward of this step ran with parameters that are not the module's own
        # Hook failures not yet reported, (what, exception), at most MAX_FAILURES: the Watcher takes them.
        self.failures: list[tuple[str, Exception]] = []
        # What the Watcher says once per probe and kind: (kind, message). 'idle': the module did not run;
        # 'foreign': its forward ran with parameters that are not its own (torch.func.functional_call).
        self.notes: list[tuple[str, str]] = []
        # The forward hook stays out of copies and pickles of the module (hooks.py).
        self.handles: list[RemovableHandle | ForwardHookHandle | KernelCallHook] = [
            ForwardHookHandle(module, self._hook)]
        self._bind()

    # --- the parameters measured: those the module holds now
    def _bind(self) -> None:
        """Hook and measure the parameters the module holds now (the gradient hooks of the previous ones removed).

        Called at watch() and whenever a training forward finds `module._parameters` changed: a parameter
        re-created (`lstm.bias_ih_l0 = nn.Parameter(...)`), or lent for one call (torch.func.functional_call).
        Only leaf nn.Parameters are hooked: a functional_call's tensors may be neither.
        """
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        m = self.module
        self._own = tuple(m._parameters.values())
        self._trains = self._training_flags()
        self.params = dict(m.named_parameters())
        self.labels = {p: keys.param_layer(p) for p in self.params}
        for pname, p in self.params.items():
            if p.requires_grad and p.is_leaf and isinstance(p, nn.Parameter):
                self._grad_handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, pname)))

    def _bound(self) -> bool:
        """Whether the module holds the parameters bound: a few pointer comparisons, nothing on the device."""
        live, own = self.module._parameters, self._own
        return len(live) == len(own) and all(map(operator.is_, live.values(), own))

    def _training_flags(self) -> tuple[bool, ...]:
        """requires_grad of each parameter bound: one that changes (frozen at watch(), unfrozen later) is hooked
        again, since a gradient hook can only sit on a tensor that requires grad."""
        return tuple(p is not None and p.requires_grad for p in self._own)

    def _check_params(self) -> None:
        """A training forward: measure the parameters it runs with, if they are not those bound."""
        if self._bound():
            if self._training_flags() != self._trains:  # frozen or unfrozen since: hook those that train now
                self._bind()
            return
        self._rebinds += 1
        if any(p is not None and not isinstance(p, nn.Parameter) for p in self.module._parameters.values()):
            self._foreign = True  # plain tensors: lent for this call (nn.Module refuses them as attributes)
        self._bind()

    def _settle(self) -> None:
        """The end of a step whose forwards found other parameters: a replacement stays, lent parameters are gone
        (or came and went within the step). Those lent: say so once, and hook the module's own again."""
        if not self._rebinds:
            return
        if self._rebinds > 1 or not self._bound():
            self._foreign = True
        self._rebinds = 0
        if self._foreign and self.handles:  # not after remove()
            self.notes.append(("foreign", f"{self.name} ran with parameters that are not its own "
                               "(torch.func.functional_call or the like): lstmwatch measures the module's own "
                               "parameters, so the gradient statistics, update ratio and gates of those steps are "
                               "left out"))
            self._bind()

    def take_notes(self) -> list[tuple[str, str]]:
        """What the Watcher says once per probe and kind, (kind, message), since the last call."""
        out, self.notes = self.notes, []
        return out

    def _weight_names(self) -> list[str]:
        """The names of the weights the module's forward reads."""
        m = self.module
        if isinstance(m, nn.RNNBase):
            return list(m._flat_weights_names)
        return [n for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if hasattr(m, n)]

    @property
    def gates(self) -> tuple[str, ...]:
        """The gates, in the order of the weights' row blocks."""
        return self.cell.gates

    def _blocks(self, pname: str) -> int:
        """How many gate blocks a parameter's rows hold (the LSTM's projection weight_hr: one)."""
        return 1 if "_hr" in pname else len(self.gates)

    # --- configuration shown in run logs and reports
    def describe(self) -> dict[str, Any]:
        """The module's configuration, as plain values."""
        m = self.module
        conf: dict[str, Any] = {"type": type(m).__name__, "parameters": sum(p.numel() for p in self.params.values())}
        for k in _CONFIG:
            if hasattr(m, k):
                conf[k] = getattr(m, k)
        return conf

    def info(self) -> ModuleInfo:
        """The watched module: qualified name, kind, configuration."""
        return ModuleInfo(self.name, self.kind, self.describe())

    def remove(self) -> None:
        """Remove every hook this probe added; safe to call twice."""
        for h in [*self.handles, *self._grad_handles]:
            h.remove()
        self.handles, self._grad_handles = [], []
        self.end_step()

    # --- hooks
    def _mark(self, site: str, finite: Tensor) -> None:
        """Date the first non-finite value at a site: finite (0-d bool, on the device) False marks this step."""
        first = self._first_bad.get(site)
        if first is None:
            first = torch.full((), math.inf, device=finite.device)
        self._first_bad[site] = stats.first_nonfinite(first, finite, self.clock.step)

    def _mark_sum(self, site: str, total: Tensor) -> None:
        """Keep a 0-d sum of what a site showed this step (NaN or Inf anywhere makes it so), for `date_sums`."""
        prev = self._sums.get(site)
        self._sums[site] = total if prev is None else prev + total

    def date_sums(self) -> None:
        """Write this step's sums, every site at once, to the tape of that set of sites."""
        if not self._sums:
            return
        sums, self._sums = self._sums, {}
        sites = tuple(sorted(sums))
        tape = self._tapes.get(sites)
        if tape is None:
            if len(self._tapes) >= MAX_SITE_SETS:  # sets that change every step: each site dated on its own
                for site in sites:
                    self._mark(site, torch.isfinite(sums[site]))
                return
            tape = self._tapes[sites] = Tape(self.clock.trip)
        dev = sums[sites[0]].device
        tape.add(torch.stack([v if v.device == dev else v.to(dev) for v in map(sums.__getitem__, sites)]),
                 self.clock.step)

    def _firsts(self) -> dict[str, Tensor]:
        """Every site's first non-finite step (0-d, +inf if none), from `_mark`'s and the tapes'."""
        out = dict(self._first_bad)
        for sites, tape in self._tapes.items():
            tape.fold()
            if tape.first_bad is None:
                continue
            for k, site in enumerate(sites):
                prev, first = out.get(site), tape.first_bad[k]
                out[site] = first if prev is None else torch.minimum(prev, first.to(prev.device))
        return out

    def _fail(self, what: str, exc: Exception) -> None:
        """A hook failed: keep the failure for the Watcher, drop what this step captured. Training goes on."""
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(_failure(f"{self.name}: {what}", exc))
        self._dropped = True
        self._drop()

    def _drop(self) -> None:
        """Forget what this step captured, after a hook failed (subclasses forget their own)."""
        self._gsq = {}

    def take_failures(self) -> list[tuple[str, Exception]]:
        """The hook failures since the last call, (what, exception), oldest first."""
        out, self.failures = self.failures, []
        return out

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        try:
            if not torch.is_grad_enabled():  # an evaluation pass, not the training step
                return
            self._ran = self._seen = self.clock.ran = True
            self._check_params()  # before the snapshot: the weights this forward runs with
            if self.clock.logging and self._weights is None and not self._dropped:
                self._snapshot(module)
            self._on_forward(args, kwargs, output)
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail("forward hook", exc)

    def _snapshot(self, module: nn.Module) -> None:
        """Keep the weights of a logging step's forward: the update ratio's 'before' and what the gates need."""
        self._weights = {n: p.detach().clone() for n, p in self.params.items()}
        self._forward_weights = self._weights
        # weight_norm and the like (forward reads computed weights), or weights set as plain tensors before each
        # call by a wrapper (fastai's WeightDropout): the weights as forward reads them.
        if parametrize.is_parametrized(module) or any(n not in self.params for n in self._weight_names()):
            with torch.no_grad():  # computed again, outside autograd: nothing saved for a checkpoint to count
                self._forward_weights = {n: getattr(module, n).detach().clone() for n in self._weight_names()
                                         if getattr(module, n, None) is not None}

    def _on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Keep what a training forward shows (subclasses)."""

    def _mark_data(self, x: Tensor) -> None:
        """Watch a forward's input for NaN/Inf with one reduction: a NaN or Inf anywhere makes the sum non-finite."""
        if x.is_floating_point():
            self._mark_sum(DATA_SITE, x.detach().sum(dtype=wide(x.dtype)))

    @eager_only  # a backward run inside a compiled function calls it eagerly: never compiled (hooks.py)
    def _on_grad(self, pname: str, p: Tensor) -> None:
        """A parameter's gradient, accumulated: NaN/Inf watch, and on a logging step its block norms."""
        try:
            self.clock.ran = True
            if p.grad is None:
                return
            scaler = scaler_of(self.clock)  # a torch.amp.GradScaler, or None
            scaled = is_scaled(scaler)
            if not self.clock.logging:
                # Outside logging steps only watch for NaN/Inf, with one reduction (the scaler's Infs are its own).
                if not scaled:
                    g = p.grad.detach() if p.grad.requires_grad else p.grad  # create_graph: keep the sum off it
                    self._mark_sum(grad_site(pname), g.sum(dtype=wide(g.dtype)))
                return
            if not self._traced_said and self._traced():
                self._say_traced()
            sq = stats.sumsq_blocks(p.grad, self._blocks(pname))
            if scaled:
                # Hooks run before unscale_: divide by the scale this backward used. An Inf here is the
                # scaler's business (it skips the step and lowers the scale), not a fault.
                # NaN marks the statistic unknown for this step, so detectors pass over it.
                scale2 = scaler._scale.to(sq.device).float().pow(2)
                self._gsq[pname] = torch.where(torch.isfinite(sq), sq / scale2, torch.nan)
                return
            self._gsq[pname] = sq
            self._mark_sum(grad_site(pname), sq.sum())
        except Exception as exc:  # noqa: BLE001 - nothing raised in a hook may reach the training loop
            self._fail(f"gradient hook of {pname}", exc)

    def _traced(self) -> bool:
        """Whether torch.compile traced a forward of the module into a graph, where the forward hook does not run
        (an nn.LSTMCell in a compiled loop; nn.LSTM under torch._dynamo.config.allow_rnn). hooks.py"""
        return any(isinstance(h, ForwardHookHandle) and h.traced for h in self.handles)

    def _say_traced(self) -> None:
        """Say once what a forward traced by torch.compile leaves out; the gradient hooks still run."""
        self._traced_said = True
        self.notes.append(("compiled", f"{self.name}'s forward is traced into a torch.compile graph, where lstmwatch "
                           "does not look: its gates, input statistics, update ratio, gradient through time and the "
                           "NaN/Inf watch of its input are left out while it is; its gradient norms and the NaN/Inf "
                           "watch of its gradients go on"))

    # --- the logging step
    def end_step(self) -> None:
        """Forget what this step captured (its NaN/Inf dated first)."""
        self.date_sums()
        self._settle()
        self._gsq = {}
        self._weights, self._forward_weights = None, {}
        self._dropped = self._ran = self._foreign = False

    def has_gradients(self) -> bool:
        """Whether a logging step's backward reached this module's parameters since the last step."""
        return bool(self._gsq)

    def collect(self, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Device statistics of this step, and the few values the host already knows.

        A record forced between logging steps (a validation loss) has no gradient statistics: the
        hooks only watched for NaN/Inf during its backward.
        """
        items: dict[str, Tensor] = {}
        host: dict[str, float] = {}
        self.date_sums()
        self._settle()
        if self.clock.logging:
            self._count_idle()
        # Dropped: a hook failed, what it kept is incomplete. Foreign: the forward ran with parameters lent to
        # it, not those measured. A module that did not run in this step has no gradient to miss (it may have
        # been replaced after watch()): its gradient statistics are left out, not reported as none.
        kept = not self._dropped and not self._foreign
        if self.clock.logging and kept and (self._ran or self._gsq):
            self.read_unhooked_grads()
            items, host = self._grad_stats()
        if self._weights is not None and kept:
            items.update(self._update_ratio(self._weights))
            try:
                items.update(self._internals(step))
            except Exception as exc:  # noqa: BLE001 - the gradient statistics of the step still stand
                if len(self.failures) < MAX_FAILURES:
                    self.failures.append(_failure(f"{self.name}: recomputing its gates", exc))
        for site, first in self._firsts().items():
            items[keys.nonfinite_key(self.name, site)] = first
        return items, host

    def read_unhooked_grads(self, stepped: set[int] | None = None) -> None:
        """On a logging step, read from `.grad` the gradients the hooks did not see: set without autograd
        accumulating them (`p.grad = g` after torch.autograd.grad, as PCGrad, meta-learning and custom trainers
        do). Called before an optimizer steps (stepped: ids of its parameters) and at the record. A GradScaler's
        step has unscaled them by then; an overflow's Inf reads as unknown (NaN), not as a fault."""
        if not self.clock.logging or self._dropped:
            return
        for pname, p in self.params.items():
            if pname not in self._gsq and p.requires_grad and isinstance(p.grad, Tensor) \
                    and (stepped is None or id(p) in stepped):
                sq = stats.sumsq_blocks(p.grad, self._blocks(pname))
                self._gsq[pname] = torch.where(torch.isfinite(sq), sq, torch.nan)

    def _count_idle(self) -> None:
        """A logging record: count those in a row with no training forward since the last; say so once."""
        self._idle = 0 if self._seen or self._gsq else self._idle + 1
        # Gradients without a forward the hooks saw: something calls `module.forward(...)` itself, past the hooks.
        # (A forward traced by torch.compile has a note of its own.)
        self._unhooked = self._unhooked + 1 if self._gsq and not self._seen and not self._traced() else 0
        self._seen = False
        if self._unhooked == IDLE_RECORDS:
            self.notes.append(("unhooked", f"{self.name}'s parameters get gradients, but for {IDLE_RECORDS} logging "
                               "steps its forward ran without its hooks, so lstmwatch sees its gradients only: no "
                               "gates, input statistics, update ratio or gradient through time. Either something "
                               "calls its `.forward(...)` directly (AWD-LSTM's WeightDrop does), which skips every "
                               "module hook: call the module itself, `module(x)`; or a torch.compile graph traced "
                               "before watch() runs its forward: call watch() before the first compiled call, or "
                               "`torch._dynamo.reset()` after it (a module traced into a graph keeps its gradient "
                               "statistics only, and lstmwatch says so)"))
        if self._idle == IDLE_RECORDS:
            self.notes.append(("idle", f"{self.name} did not run in a training forward for {IDLE_RECORDS} logging "
                               "steps: was it replaced after watch() (`model.lstm = nn.LSTM(...)`)? Call "
                               "lstmwatch.watch(model) again on the model; meanwhile its gradient statistics are "
                               "left out"))

    def _grad_stats(self) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient norms per parameter, layer-direction and gate, from the block norms the hooks kept."""
        n, dev = self.name, next(iter(self.params.values())).device
        items: dict[str, Tensor] = {}
        trainable = sum(p.requires_grad for p in self.params.values())
        host = {keys.module_key(n, "grads_seen"): len(self._gsq) / max(1, trainable),
                keys.module_key(n, "trainable"): trainable / len(self.params)}
        zero = torch.zeros((), device=dev)
        layer_sq: dict[str, Tensor] = {}
        gate_sq: dict[str, Tensor] = {}
        for pname in self.params:
            sq = self._gsq.get(pname)
            if sq is None:
                continue
            items[keys.param_key(n, pname)] = sq.sum().sqrt()
            lab = self.labels.get(pname, "other")
            layer_sq[lab] = layer_sq.get(lab, zero) + sq.sum()
            if sq.numel() == len(self.gates):
                gate_sq[lab] = gate_sq.get(lab, torch.zeros(len(self.gates), device=dev)) + sq
        items[keys.module_key(n, "grad_norm")] = sum(layer_sq.values(), zero).sqrt()
        for lab in sorted(set(self.labels.values())):
            items[keys.layer_key(n, lab, "grad_norm")] = layer_sq.get(lab, zero).sqrt()
            gq = gate_sq.get(lab)
            for k, gate in enumerate(self.gates):
                items[keys.gate_key(n, lab, gate, "grad_norm")] = gq[k].sqrt() if gq is not None else zero
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
        return {keys.layer_key(self.name, lab, "update_ratio"): (d2[lab] / w2[lab].clamp_min(1e-30)).sqrt()
                for lab in d2}

    def _internals(self, step: int) -> dict[str, Tensor]:
        """Statistics of what the forward showed (subclasses)."""
        return {}


def gtt_items(module: str, layer: str | None, tt: stats.ThroughTime) -> dict[str, Tensor]:
    """The gradient through time of a layer-direction (or, layer None, of the module) under its keys."""
    return {keys.gtt_key(module, layer): tt.curve, keys.gtt_key(module, layer, "ratio"): tt.ratio,
            keys.gtt_key(module, layer, "decay"): tt.decay}


def gate_items(module: str, layer: str, st: dict[tuple[str, str], Tensor]) -> dict[str, Tensor]:
    """A layer-direction's gate statistics, keyed (gate or state, statistic), under their keys."""
    return {keys.gate_key(module, layer, gate, stat): v.detach() for (gate, stat), v in st.items()}
