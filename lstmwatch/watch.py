"""The Watcher: finds the LSTMs, moves the clock, and runs each logging step: probes -> record -> detectors -> sinks."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import keys, stats
from .detectors import Detectors, default_detectors
from .events import Event, LSTMWatchFailure, LSTMWatchWarning
from .frames import user_frame, user_stacklevel
from .interfaces import Detector, Header, ModuleInfo, Sink, Summary
from .probes import Probe, probe_for
from .record import Record
from .schedule import Clock, Schedule

if TYPE_CHECKING:
    from .run import Run

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
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) and isinstance(inner, nn.Module):
            model = inner
        elif isinstance(compiled, nn.Module):
            model = compiled
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


def _probe(name: str, module: nn.Module, clock: Clock) -> Probe:
    cls = probe_for(module)
    assert cls is not None, "find_modules returns only modules with a probe"
    return cls(name, module, clock)


class Watcher:
    """Watches the LSTMs of a model: call `step(loss)` once per optimizer step, `close()` at the end."""

    closed: bool = False  # set before anything can fail in __init__: __del__ and a later watch() read it

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every: int | Schedule = 50,
        sample: int = 8,
        modules: ModuleFilter = None,
        detectors: Iterable[Detector] | None = None,
        sinks: Iterable[Sink] = (),
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
        self.probes: list[Probe] = [_probe(name, m, self.clock) for name, m in found]
        for _, m in found:
            _OPEN[m] = weakref.ref(self)
        # One suite: the loss trend is computed once per record and shared by the detectors that read it.
        self.detectors = detectors if isinstance(detectors, Detectors) else Detectors(detectors or ())
        self.sinks = list(sinks)
        self.records: deque[Record] = deque(maxlen=max_records)
        self.events: deque[Event] = deque(maxlen=max_events)
        self.closed = False
        self._loss_sum: Tensor | None = None
        self._loss_n = 0
        self._loss_last: Tensor | None = None
        self._loss_bad: Tensor | None = None
        self._failed: set[int] = set()  # ids of detectors and sinks switched off after a failure
        # What the run is, built once: sinks get it, never the watcher.
        self.header = Header.of([ModuleInfo(p.name, p.kind, p.describe()) for p in self.probes], log_every, sample)
        for s in self.sinks:
            self._call(s, "start", self.header)

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
        return next((str(path) for s in self.sinks if (path := getattr(s, "path", None))), None)

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
        summary = Summary(self.step_count, len(self.records), len(self.events))
        for s in self.sinks:
            self._call(s, "close", summary)

    def as_run(self) -> Run:
        """This run so far, as the report and `lstmwatch.load` see runs."""
        from .run import Run

        return Run.live(self.header, list(self.records), list(self.events), self.step_count, self.log_path)

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

    def state_dict(self) -> dict[str, Any]:
        """What a run resumed from a checkpoint needs to go on where this one stopped, as plain values: the step,
        the loss since the last record, the events so far and every detector's trends, streaks and latches."""
        loss_sum = float(self._loss_sum) if self._loss_sum is not None else None  # a sync: checkpoints only
        bad = float(self._loss_bad) if self._loss_bad is not None else None
        return {
            "step": self.clock.step,
            # The sampler's state: a resumed run samples the rows the uninterrupted run would have.
            "generator": self.clock.generator.get_state().tolist() if self.clock.generator is not None else None,
            "loss": {"sum": loss_sum, "n": self._loss_n, "first_nonfinite": bad},
            "events": [dataclasses.asdict(e) for e in self.events],
            "detectors": self.detectors.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run a `state_dict()` was taken from: call before the first `step()` of the resumed run."""
        self.detectors.load_state_dict(state["detectors"])  # first: a mismatch changes nothing
        self.clock.seek(int(state["step"]))
        if state.get("generator") is not None and self.clock.generator is not None:
            self.clock.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        loss = state.get("loss", {})
        self._loss_sum = torch.tensor(loss["sum"]) if loss.get("sum") is not None else None
        self._loss_n = int(loss.get("n", 0))
        self._loss_bad = torch.tensor(loss["first_nonfinite"]) if loss.get("first_nonfinite") is not None else None
        self._loss_last = self._loss_sum / self._loss_n if self._loss_sum is not None and self._loss_n else None
        self.events.clear()
        self.events.extend(Event(**e) for e in state.get("events", []))

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
        norms = [items[k] for p in self.probes if (k := keys.module_key(p.name, keys.GRAD_NORM)) in items]
        if norms:
            dev = norms[0].device
            items[keys.GRAD_NORM] = torch.stack([n.to(dev) for n in norms]).pow(2).sum().sqrt()
        if self._loss_last is not None and self._loss_sum is not None and self._loss_bad is not None:
            items[keys.LOSS] = self._loss_last
            items[keys.LOSS_MEAN] = self._loss_sum / self._loss_n
            items[keys.NONFINITE_LOSS] = self._loss_bad
        if isinstance(val_loss, Tensor):
            items[keys.VAL_LOSS] = val_loss.detach().float().reshape(())
        values, curves = stats.to_host(items)
        values.update(host)
        if val_loss is not None and not isinstance(val_loss, Tensor):
            values[keys.VAL_LOSS] = float(val_loss)
        # Sites that never went non-finite hold +inf: leave them out.
        values = {k: v for k, v in values.items() if not (v == math.inf and keys.combine_of(k) is keys.Combine.FIRST)}
        self._loss_sum, self._loss_n = None, 0
        record = Record(step=s, loss=values.get(keys.LOSS), stats=values, curves=curves,
                        val_loss=values.get(keys.VAL_LOSS), modules=tuple(self.modules))
        self.records.append(record)
        events: list[Event] = []
        self._call(self.detectors, "observe", record)
        for d in self.detectors:
            events.extend(self._guard(d, f"{type(d).__name__}.update", self.detectors.run, d, record) or [])
        self.events.extend(events)
        for sink in self.sinks:
            self._call(sink, "write", record, events)
        return record

    def _call(self, obj: Any, method: str, *args: Any) -> Any:
        """Call a probe, detector or sink's method if it has one, guarded as `_guard` says."""
        fn = getattr(obj, method, None)
        return None if fn is None else self._guard(obj, f"{type(obj).__name__}.{method}", fn, *args)

    def _guard(self, obj: Any, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on behalf of `obj`; an `obj` that fails is reported once and switched off, training goes on."""
        if id(obj) in self._failed:
            return None
        try:
            return fn(*args)
        except LSTMWatchWarning:
            raise  # the user turned lstmwatch's warnings into errors: that is theirs to see
        except Exception as exc:  # noqa: BLE001 - a monitoring failure must never stop training
            self._failed.add(id(obj))
            warnings.warn(f"lstmwatch: {what} failed and is switched off: "
                          f"{type(exc).__name__}: {exc}", LSTMWatchFailure, stacklevel=user_stacklevel())
            return None


def watch(
    model: nn.Module,
    *,
    log_every: int | Schedule = 50,
    sample: int = 8,
    modules: ModuleFilter = None,
    console: bool = True,
    detectors: Iterable[Detector] | dict[str, Any] | None = None,
    scaler: Any | None = None,
    **sink_options: Any,
) -> Watcher:
    """Attach lstmwatch to every nn.LSTM (and nn.GRU, nn.LSTMCell, nn.GRUCell) inside `model`; returns the Watcher."""
    from .sinks import make_sinks

    sinks = make_sinks(console=console, **sink_options)
    if detectors is None:
        dets = default_detectors()
    elif isinstance(detectors, dict):
        dets = default_detectors(**detectors)  # tune the defaults: {"stalled_loss": {"patience": 500}}
    else:
        dets = Detectors(detectors)
    return Watcher(model, log_every=log_every, sample=sample, modules=modules, detectors=dets, sinks=sinks,
                   scaler=scaler)
