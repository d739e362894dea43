"""The Watcher: finds the LSTMs, keeps the schedule, and runs each logging step."""

from __future__ import annotations

import fnmatch
import math
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import stats
from ._frames import user_frame
from .events import Event, LSTMWatchFailure, LSTMWatchWarning, Record
from .probes import Probe, probe_for
from .schedule import Clock, Schedule
from .sinks.console import user_stacklevel

ModuleFilter = Sequence[str] | Callable[[str, nn.Module], bool] | None

# Every open watcher, by the modules it watches: a second watch() closes the first
# instead of piling hooks on top of it (notebook reruns). Weak both ways, so that a dropped
# watcher is collected and its __del__ removes its hooks.
_OPEN: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Watcher]] = weakref.WeakKeyDictionary()


def _open_watcher(module: nn.Module) -> Watcher | None:
    ref = _OPEN.get(module)
    return ref() if ref is not None else None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel, DataParallel or torch.compile's wrapper."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and inner is not None:
            model = inner
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def find_scaler(depth: int = 3) -> Any | None:
    """An enabled GradScaler among the variables of the caller's frames (the training loop), if any."""
    amp = getattr(torch, "amp", None)
    cls = getattr(amp, "GradScaler", None)
    if cls is None:
        return None
    frame = user_frame()[0]
    for _ in range(depth):
        if frame is None:
            break
        for scope in (frame.f_locals, frame.f_globals):
            for v in list(scope.values()):
                if isinstance(v, cls) and v.is_enabled():
                    return v
        frame = frame.f_back
    return None


def find_modules(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """Every watchable module of a model, by qualified name, narrowed by `modules`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lstmwatch.watch needs an nn.Module, got {type(model).__name__}")
    root = unwrap(model)
    # The root is named by its type; weight_norm and other parametrizations subclass it as Parametrized<Type>.
    found = [(name or type(m).__name__.lower().removeprefix("parametrized"), m)
             for name, m in root.named_modules() if probe_for(m)]
    if not found:
        kinds = sorted({type(m).__name__ for m in root.modules()})
        raise ValueError(f"no nn.LSTM, nn.GRU, nn.LSTMCell or nn.GRUCell found in {type(root).__name__}; "
                         f"it contains: {', '.join(kinds)}")
    if modules is None:
        return found
    if callable(modules):
        chosen = [(n, m) for n, m in found if modules(n, m)]
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, pat) for pat in modules)]
    if not chosen:
        raise ValueError(f"modules={modules!r} matched none of the modules found: {', '.join(n for n, _ in found)}")
    return chosen


class Watcher:
    """Watches the LSTMs of a model: call `step(loss)` once per optimizer step, `close()` at the end."""

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every: int | Schedule = 50,
        sample: int = 8,
        modules: ModuleFilter = None,
        detectors: Iterable[Any] | None = None,
        sinks: Iterable[Any] = (),
        scaler: Any | None = None,
        max_records: int = 10_000,
        max_events: int = 1_000,
        seed: int = 0,
    ):
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        found = find_modules(model, modules)
        self.log_every, self.sample = log_every, sample
        self.clock = Clock.start(log_every, sample, torch.Generator().manual_seed(seed), scaler)
        for _, m in found:
            prev = _open_watcher(m)
            if prev is not None and not prev.closed:
                warnings.warn("lstmwatch: this model was already watched; closing the previous watcher first",
                              LSTMWatchFailure, stacklevel=3)
                prev.close()
        self.probes: list[Probe] = [probe_for(m)(name, m, self.clock) for name, m in found]
        for _, m in found:
            _OPEN[m] = weakref.ref(self)
        self.detectors = list(detectors) if detectors is not None else []
        self.sinks = list(sinks)
        self.records: deque[Record] = deque(maxlen=max_records)
        self.events: deque[Event] = deque(maxlen=max_events)
        self.closed = False
        self._loss_sum: Tensor | None = None
        self._loss_n = 0
        self._loss_last: Tensor | None = None
        self._loss_bad: Tensor | None = None
        self._failed: set[int] = set()  # ids of detectors and sinks switched off after a failure
        for s in self.sinks:
            self._call(s, "start", self)

    # --- public
    @property
    def modules(self) -> list[str]:
        """Qualified names of the watched modules."""
        return [p.name for p in self.probes]

    @property
    def latest(self) -> Record | None:
        """The last record, or None before the first logging step."""
        return self.records[-1] if self.records else None

    @property
    def log_path(self) -> str | None:
        """Where the run log is written, if watch() was given log_dir= or log_path=."""
        return next((str(s.path) for s in self.sinks if getattr(s, "path", None)), None)

    @property
    def step_count(self) -> int:
        """How many times step() was called."""
        return self.clock.step - 1

    def step(self, loss: Tensor | float | None = None, *, val_loss: Tensor | float | None = None) -> Record | None:
        """Mark the end of one optimizer step; on a logging step, measure and report. Returns the record."""
        if self.closed:
            raise RuntimeError("this Watcher is closed; call lstmwatch.watch(model) again to watch a new run")
        s = self.clock.step
        if self.clock.scaler is None and s == 1:
            # Mixed precision: hooks see gradients times the GradScaler's scale. Find the scaler the
            # training loop uses, once, so gradients are judged unscaled and its Infs are not faults.
            scaler = find_scaler()
            if scaler is not None:
                self.clock.scaler = scaler
                for p in self.probes:
                    p.adopt_scaler(scaler)
        if loss is not None:
            self._add_loss(loss, s)
        record = None
        if self.clock.logging or val_loss is not None:
            record = self._log(s, val_loss)
        for p in self.probes:
            p.end_step()
        self.clock.advance()
        return record

    def close(self) -> None:
        """Remove every hook lstmwatch added and close the sinks; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for p in self.probes:
            p.remove()
            if _open_watcher(p.module) is self:
                del _OPEN[p.module]
        for s in self.sinks:
            self._call(s, "close")

    def diagnose(self) -> list:
        """The run's events ranked by likely root cause, each with its consequences."""
        from .diagnose import diagnose

        return diagnose(list(self.events))

    def summary(self) -> str:
        """The diagnosis as text for people."""
        from .diagnose import summary

        return summary(self.diagnose(), steps=self.step_count, modules=self.modules)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"step {self.step_count}"
        return f"Watcher({', '.join(self.modules)}; {state}; {len(self.records)} records, {len(self.events)} events)"

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A watcher dropped without close() must not leave hooks behind on the user's model.
        try:
            if not self.closed:
                for p in self.probes:
                    p.remove()
        except Exception:
            pass

    # --- internals
    def _add_loss(self, loss: Tensor | float, s: int) -> None:
        t = loss.detach().float().reshape(()) if isinstance(loss, Tensor) else torch.tensor(float(loss))
        self._loss_sum = t if self._loss_sum is None else self._loss_sum + t
        self._loss_n += 1
        self._loss_last = t
        bad = self._loss_bad if self._loss_bad is not None else torch.full((), math.inf, device=t.device)
        self._loss_bad = stats.first_nonfinite(bad, torch.isfinite(t), s)

    def _log(self, s: int, val_loss: Tensor | float | None) -> Record:
        items: dict[str, Tensor] = {}
        host: dict[str, float] = {}
        for p in self.probes:
            got = self._call(p, "collect", s)
            if got is None:  # it failed: _call said so once; its hooks go too
                p.remove()
                continue
            items.update(got[0])
            host.update(got[1])
        norms = [items[k] for p in self.probes if (k := f"{p.name}/grad_norm") in items]
        if norms:
            dev = norms[0].device
            items["grad_norm"] = torch.stack([n.to(dev) for n in norms]).pow(2).sum().sqrt()
        if self._loss_last is not None:
            items["loss"] = self._loss_last
            items["loss_mean"] = self._loss_sum / self._loss_n
            items["nonfinite_loss"] = self._loss_bad
        if isinstance(val_loss, Tensor):
            items["val_loss"] = val_loss.detach().float().reshape(())
        values, curves = stats.to_host(items)
        values.update(host)
        if val_loss is not None and not isinstance(val_loss, Tensor):
            values["val_loss"] = float(val_loss)
        # Sites that never went non-finite hold +inf: leave them out.
        values = {k: v for k, v in values.items() if not ("nonfinite" in k and v == math.inf)}
        self._loss_sum, self._loss_n = None, 0
        record = Record(step=s, loss=values.get("loss"), stats=values, curves=curves,
                        val_loss=values.get("val_loss"), modules=tuple(self.modules))
        self.records.append(record)
        events: list[Event] = []
        for d in self.detectors:
            events.extend(self._call(d, "update", record) or [])
        self.events.extend(events)
        for sink in self.sinks:
            self._call(sink, "write", record)
            for e in events:
                self._call(sink, "emit", e)
        return record

    def _call(self, obj: Any, method: str, *args: Any) -> Any:
        """Call a probe, detector or sink; one that fails is reported once and switched off, training goes on."""
        if id(obj) in self._failed or not hasattr(obj, method):
            return None
        try:
            return getattr(obj, method)(*args)
        except LSTMWatchWarning:
            raise  # the user turned lstmwatch's warnings into errors: that is theirs to see
        except Exception as exc:  # noqa: BLE001 - a monitoring failure must never stop training
            self._failed.add(id(obj))
            warnings.warn(f"lstmwatch: {type(obj).__name__}.{method} failed and is switched off: "
                          f"{type(exc).__name__}: {exc}", LSTMWatchFailure, stacklevel=user_stacklevel())
            return None


def watch(
    model: nn.Module,
    *,
    log_every: int | Schedule = 50,
    sample: int = 8,
    modules: ModuleFilter = None,
    console: bool = True,
    detectors: Iterable[Any] | dict[str, Any] | None = None,
    scaler: Any | None = None,
    **sink_options: Any,
) -> Watcher:
    """Attach lstmwatch to every nn.LSTM (and nn.GRU, nn.LSTMCell, nn.GRUCell) inside `model`; returns the Watcher."""
    from .detectors import default_detectors
    from .sinks import make_sinks

    sinks = make_sinks(console=console, **sink_options)
    if detectors is None:
        dets = default_detectors()
    elif isinstance(detectors, dict):
        dets = default_detectors(**detectors)  # tune the defaults: {"stalled_loss": {"patience": 500}}
    else:
        dets = list(detectors)
    return Watcher(model, log_every=log_every, sample=sample, modules=modules, detectors=dets, sinks=sinks,
                   scaler=scaler)
