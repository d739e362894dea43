"""The Watcher: finds the LSTMs, moves the clock, and runs each logging step: probes -> record -> detectors -> sinks."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
import sys
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import amp, keys, stats
from .detectors import Detectors, default_detectors
from .distributed import SHARDED, Ranks, combine, name_ranks, sharded, wait_s_from, world
from .events import Event, EventLog, LSTMWatchFailure, LSTMWatchWarning
from .frames import user_stacklevel
from .interfaces import Detector, Header, ModuleInfo, Sink, Summary
from .probes import Probe, probe_for
from .record import Record
from .schedule import Clock, Schedule
from .tape import Tape
from .tripwire import Tripwire

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


def find_modules(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """Every watchable module of a model, by qualified name, narrowed by `modules`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lstmwatch.watch needs an nn.Module, got {type(model).__name__}")
    root = unwrap(model)
    # The root is named by its type; weight_norm and other parametrizations subclass it as Parametrized<Type>.
    # A submodule compiled in place (`model.rnn = torch.compile(model.rnn)`) holds it as `_orig_mod`: named as
    # the user named it, `rnn`.
    found = [(name.replace("._orig_mod", "").removeprefix("_orig_mod.").removesuffix("_orig_mod").rstrip(".")
              or type(m).__name__.lower().removeprefix("parametrized"), m)
             for name, m in root.named_modules() if probe_for(m)]
    if not found:
        kinds = sorted({type(m).__name__ for m in root.modules()})
        raise ValueError(f"no nn.LSTM, nn.GRU, nn.LSTMCell or nn.GRUCell found in {type(root).__name__}; "
                         f"it contains: {', '.join(kinds)}")
    for name, m in found:
        if sharded(m):
            raise ValueError(SHARDED.format(name=name))
    if modules is None:
        return found
    if callable(modules):
        chosen = [(n, m) for n, m in found if modules(n, m)]
    else:
        if isinstance(modules, str):
            modules = [modules]
        chosen = [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, pat) for pat in modules)]
        # Every name or pattern must match something: a misspelt one beside a good one is a module left out.
        unmatched = [pat for pat in modules if not any(fnmatch.fnmatchcase(n, pat) for n, _ in found)]
        if chosen and unmatched:
            raise ValueError(f"modules={modules!r}: {', '.join(map(repr, unmatched))} matched none of the modules "
                             f"found: {', '.join(n for n, _ in found)}")
    if not chosen:
        raise ValueError(f"modules={modules!r} matched none of the modules found: {', '.join(n for n, _ in found)}")
    return chosen


def _before_optimizer_step(ref: weakref.ref[Watcher]) -> Callable[..., None]:
    """A global optimizer step pre-hook for one watcher, which it does not keep alive."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        w = ref()
        if w is not None and not w.closed and w.clock.logging:
            w._guard(w, "reading gradients before an optimizer step", w._grads_before_step, opt,
                     switch_off=False)  # it runs inside the user's optimizer.step(): nothing may raise there

    return hook


def _check_args(*, sample: Any, scaler: Any, modules: Any, max_records: Any, max_events: Any) -> None:
    """Refuse what cannot work at watch() time, naming the argument and what to pass instead."""
    for name, v in (("sample", sample), ("max_records", max_records), ("max_events", max_events)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int >= 1, got {v!r} ({type(v).__name__})")
        if v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v}")
    if scaler is not None and not (callable(getattr(scaler, "is_enabled", None))
                                   and callable(getattr(scaler, "get_scale", None))):
        raise TypeError(f"scaler must be your torch.amp.GradScaler (or None: lstmwatch looks for it), got "
                        f"{type(scaler).__name__}")
    ok = (modules is None or callable(modules) or isinstance(modules, str)
          or (isinstance(modules, (list, tuple, set, frozenset)) and all(isinstance(m, str) for m in modules)))
    if not ok:
        raise TypeError("modules must be a name or glob pattern, a list of them, or a (name, module) -> bool "
                        f"callable, got {modules!r}")


_WIDE = (torch.float32, torch.float64)  # loss dtypes kept as they are; others widen to float32 (integers: float64)


def _scalar(x: Any, name: str, refused: list[TypeError]) -> Tensor | None:
    """A loss as a 0-d tensor of at least float32 precision (float64 stays float64), or None; a value that is
    not a scalar is noted in `refused` and read as None."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.numel() == 1:
            t = x.detach() if x.requires_grad else x
            t = t.reshape(()) if t.dim() else t
            return t if t.dtype in _WIDE else \
                t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.double()
        refused.append(TypeError(f"{name} must be a scalar (a 0-d tensor or a number), got a tensor of shape "
                                 f"{tuple(x.shape)}: pass the reduced value, e.g. `{name}.mean()`"))
        return None
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    refused.append(TypeError(f"{name} must be a scalar (a 0-d tensor or a number), got {type(x).__name__} "
                             f"{str(x)[:40]!r}"))
    return None


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
        max_records: int = 1_000,
        max_events: int = 1_000,
        seed: int = 0,
        rank_timeout: float | None = None,
        name: str | None = None,
        quiet: bool = False,
    ):
        _check_args(sample=sample, scaler=scaler, modules=modules, max_records=max_records, max_events=max_events)
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise TypeError(f"name must be a non-empty str (the run's name), got {name!r}")
        found = find_modules(model, modules)
        # Under torch.distributed every rank measures; rank 0 combines and is the only one to report.
        self.ranks = Ranks(wait_s_from(rank_timeout), [m for _, m in found])
        self.log_every, self.sample = log_every, sample
        self.clock = Clock.start(log_every, sample, torch.Generator().manual_seed(seed), scaler)
        # A NaN brings a record forward, except in a distributed job: there a record is the whole job's, made
        # at logging steps by every rank together; a rank's own forced record could blame its gradients for
        # another rank's bad batch. The tapes still date it exactly at the next logging step.
        self.clock.trip = Tripwire() if self.ranks.size == 1 else None
        if scaler is None:
            # Mixed precision: hooks see gradients times the GradScaler's scale. The scaler that scales the
            # loss, wherever it lives, becomes this clock's before the backward pass (amp.py).
            amp.follow(self.clock)
        for _, m in found:
            prev = _open_watcher(m)
            if prev is not None and not prev.closed:
                # A notebook cell run again, most often: a note, not a warning; the earlier watcher's hooks go.
                if not quiet:
                    print("lstmwatch: this model was already watched; the earlier watcher is closed", file=sys.stderr)
                prev.close()
        self.probes: list[Probe] = [_probe(name, m, self.clock) for name, m in found]
        # Gradients handed to an optimizer by hand (`p.grad = g`) pass no gradient hook: read them as it steps.
        self._opt_hook = register_optimizer_step_pre_hook(_before_optimizer_step(
            weakref.ref(self)))
        for _, m in found:
            _OPEN[m] = weakref.ref(self)
        # One suite: the loss trend is computed once per record and shared by the detectors that read it.
        self.detectors = detectors if isinstance(detectors, Detectors) else Detectors(detectors or ())
        self.sinks = list(sinks) if self.ranks.leader else []
        self.records: deque[Record] = deque(maxlen=max_records)
        self.events = EventLog(max_events)  # the first of each kind and module, then the latest
        self.closed = False
        self._losses = Tape(self.clock.trip)  # the loss of each step
        self._failed: set[int] = set()  # ids of detectors and sinks switched off after a failure
        self._reported: set[tuple[int, str]] = set()  # (id, what) of failures already reported once
        # What the run is, built once: sinks get it, never the watcher.
        self.header = Header.of([ModuleInfo(p.name, p.kind, p.describe()) for p in self.probes], log_every, sample,
                                self.ranks.size, name or "")
        for s in self.sinks:
            self._call(s, "follow", self.clock)  # a sink that places records by the user's steps (W&B)
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
        """Mark the end of one optimizer step; on a logging step, measure and report. Returns the record.

        A loss or val_loss that is not a scalar is refused with a TypeError, after the step is counted and
        recorded without it; nothing lstmwatch fails at itself is raised here.
        """
        if self.closed:
            raise RuntimeError("this Watcher is closed; call lstmwatch.watch(model) again to watch a new run")
        refused: list[TypeError] = []
        loss_t = _scalar(loss, "loss", refused)
        val_t = _scalar(val_loss, "val_loss", refused)
        s = self.clock.step
        record = None
        try:
            if loss_t is not None:
                self._losses.add(loss_t, s)
            # A NaN or Inf of this step (read at once on a CPU) or of an earlier one whose flag has reached the
            # host (a GPU): a record now, not at the next logging step.
            tripped = self._trip(s)
            if self.clock.logging or val_t is not None or tripped:
                record = self._log(s, val_t)
        except LSTMWatchWarning:
            raise  # the user turned lstmwatch's warnings into errors: that is theirs to see
        except Exception as exc:  # noqa: BLE001 - a monitoring failure must never stop training
            self._report(self, f"step {s}", exc, "this step's statistics are skipped")
        finally:
            for p in self.probes:
                self._guard(p, f"{p.name}: forgetting step {s}", p.end_step, switch_off=False)
            self._hook_failures()
            self.clock.advance()
            self._probe_notes()
        if refused:
            raise refused[0]
        return record

    def close(self) -> None:
        """Remove every hook lstmwatch added and close the sinks; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        amp.unfollow(self.clock)
        self._opt_hook.remove()
        if self.step_count == 0 and any(self._guard(p, f"{p.name}.has_gradients", p.has_gradients, switch_off=False)
                                        for p in self.probes):
            warnings.warn("lstmwatch: gradients reached the watched modules but watcher.step() was never called, "
                          "so nothing was measured: call `watcher.step(loss)` once per optimizer step, after "
                          "`optimizer.step()`", LSTMWatchFailure, stacklevel=user_stacklevel())
        self._hook_failures()
        for p in self.probes:
            self._guard(p, f"{p.name}.remove", p.remove, switch_off=False)
            if _open_watcher(p.module) is self:
                del _OPEN[p.module]
        summary = Summary(self.step_count, len(self.records), self.events.total)
        for s in self.sinks:
            self._call(s, "close", summary)

    def as_run(self) -> Run:
        """This run so far, as the report and `lstmwatch.load` see runs."""
        from .run import Run

        return Run.live(self.header, list(self.records), list(self.events), self.step_count, self.log_path)

    def _repr_html_(self) -> str:
        """The run so far, diagnosis and plots, as the last line of a notebook cell."""
        return self.as_run()._repr_html_()

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
        return {
            "step": self.clock.step,
            # The sampler's state: a resumed run samples the rows the uninterrupted run would have.
            "generator": self.clock.generator.get_state().tolist() if self.clock.generator is not None else None,
            "loss": self._losses.state(),  # reads the device: checkpoints only
            "events": [dataclasses.asdict(e) for e in self.events],
            "detectors": self.detectors.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run a `state_dict()` was taken from: call before the first `step()` of the resumed run."""
        self.detectors.load_state_dict(state["detectors"])  # first: a mismatch changes nothing
        self.clock.seek(int(state["step"]))
        if state.get("generator") is not None and self.clock.generator is not None:
            self.clock.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._losses.load(state.get("loss", {}))
        self.events.clear()
        self.events.extend(Event(**e) for e in state.get("events", []))

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A watcher dropped without close() must not leave hooks behind: on the user's model, or the global
        # optimizer step pre-hook (it would run on every optimizer step of the process).
        try:
            if not self.closed:
                opt_hook = getattr(self, "_opt_hook", None)
                if opt_hook is not None:
                    opt_hook.remove()
                for p in self.probes:
                    p.remove()
        except Exception:
            pass

    # --- internals
    def _log(self, s: int, val_loss: Tensor | None) -> Record:
        items: dict[str, Tensor] = {}
        host: dict[str, float] = {}
        for p in self.probes:
            got = self._guard(p, f"{p.name}: statistics of step {s}", p.collect, s, switch_off=False)
            if got is None:  # it failed: said once; this step goes without its statistics, the next may not
                continue
            items.update(got[0])
            host.update(got[1])
        norms = [items[k] for p in self.probes if (k := keys.module_key(p.name, keys.GRAD_NORM)) in items]
        if norms:
            dev = norms[0].device
            items[keys.GRAD_NORM] = torch.stack([n.to(dev) for n in norms]).pow(2).sum().sqrt()
        tape = self._losses
        tape.fold()
        if tape.last is not None and tape.sum is not None and tape.first_bad is not None:
            items[keys.LOSS] = tape.last
            items[keys.LOSS_MEAN] = tape.sum / tape.n
            items[keys.NONFINITE_LOSS] = tape.first_bad
        if val_loss is not None:
            items[keys.VAL_LOSS] = val_loss
        values, curves = stats.to_host(items)
        values.update(host)
        # A distributed job: rank 0 combines every rank's values of a logging step (only those: a record forced
        # by one rank's val_loss is its own), the other ranks hand theirs over and report nothing.
        parts = self.ranks.gather(s, values, curves, self.clock.is_logging) if self.clock.logging \
            else [(self.ranks.rank, values, curves)]
        if self.ranks.moved:  # this rank's count of step() calls had drifted from rank 0's: it takes rank 0's
            self.clock.seek(s + self.ranks.moved)
        source: dict[str, int] = {}
        if parts is not None:
            values, curves, source = combine(parts)
        # Sites that never went non-finite hold +inf: leave them out. The keys of every record are the same
        # strings: interned, thousands of records share them.
        values = {sys.intern(k): v for k, v in values.items()
                  if not (v == math.inf and keys.combine_of(k) is keys.Combine.FIRST)}
        curves = {sys.intern(k): c for k, c in curves.items()}
        tape.restart()
        record = Record(step=s, loss=values.get(keys.LOSS), stats=values, curves=curves,
                        val_loss=values.get(keys.VAL_LOSS), modules=tuple(self.modules))
        self.records.append(record)
        if not self.ranks.leader:
            return record
        events: list[Event] = []
        self._call(self.detectors, "observe", record)
        for d in self.detectors:
            events.extend(self._guard(d, f"{type(d).__name__}.update", self.detectors.run, d, record) or [])
        events = name_ranks(events, source, self.ranks.size)
        self.events.extend(events)
        for sink in self.sinks:
            self._call(sink, "write", record, events)
        return record

    def _trip(self, s: int) -> bool:
        """Whether the tripwire learnt of a NaN or Inf by now: this step's sums are dated first, so it sees them."""
        trip = self.clock.trip
        if trip is None or not trip.armed:
            return False
        for p in self.probes:
            self._guard(p, f"{p.name}: the NaN/Inf watch of step {s}", p.date_sums, switch_off=False)
        trip.arm(s)
        return trip.poll() is not None

    def _call(self, obj: Any, method: str, *args: Any) -> Any:
        """Call a probe, detector or sink's method if it has one, guarded as `_guard` says."""
        fn = getattr(obj, method, None)
        return None if fn is None else self._guard(obj, f"{type(obj).__name__}.{method}", fn, *args)

    def _guard(self, obj: Any, what: str, fn: Callable[..., Any], *args: Any, switch_off: bool = True) -> Any:
        """Run `fn` on behalf of `obj`; training goes on whatever it raises. A failure is reported once; with
        `switch_off` the object is not called again (a sink, a detector), else only this call is lost (a
        probe's statistics of one step)."""
        if id(obj) in self._failed:
            return None
        try:
            return fn(*args)
        except LSTMWatchWarning:
            raise  # the user turned lstmwatch's warnings into errors: that is theirs to see
        except Exception as exc:  # noqa: BLE001 - a monitoring failure must never stop training
            if switch_off:
                self._failed.add(id(obj))
            self._report(obj, what, exc, "it is switched off" if switch_off else "this step goes without it")
            return None

    def _grads_before_step(self, opt: torch.optim.Optimizer) -> None:
        """An optimizer is about to step on a logging step: the probes read the gradients their hooks missed."""
        stepped = {id(p) for group in opt.param_groups for p in group["params"]}
        for p in self.probes:
            self._guard(p, f"{p.name}.read_unhooked_grads", p.read_unhooked_grads, stepped, switch_off=False)

    def _hook_failures(self) -> None:
        """Say what the probes' hooks failed at since the last step (they never raise into training)."""
        for p in self.probes:
            for what, exc in p.take_failures():
                self._report(p, what, exc, "its statistics of this step are skipped")

    def _probe_notes(self) -> None:
        """Say once per probe and kind what the probes noticed about their modules (one replaced after watch(),
        parameters lent by torch.func.functional_call): not faults of the model, and not lstmwatch's."""
        for p in self.probes:
            for kind, message in p.take_notes():
                self._say_once((id(p), f"note:{kind}"), message)

    def _report(self, obj: Any, what: str, exc: Exception, consequence: str) -> None:
        """Say once per object and kind of failure what lstmwatch could not do; training goes on."""
        self._say_once((id(obj), type(exc).__name__),
                       f"{what} failed, {consequence}: {type(exc).__name__}: {str(exc)[:300]}")

    def _say_once(self, key: tuple[int, str], message: str) -> None:
        """An LSTMWatchFailure at the user's line, the first time `key` comes up in this run."""
        if key in self._reported:
            return
        self._reported.add(key)
        warnings.warn(f"lstmwatch: {message}", LSTMWatchFailure, stacklevel=user_stacklevel())


def watch(
    model: nn.Module,
    *,
    log_every: int | Schedule = 50,
    sample: int = 8,
    modules: ModuleFilter = None,
    console: bool = True,
    detectors: Iterable[Detector] | dict[str, Any] | None = None,
    scaler: Any | None = None,
    max_records: int = 1_000,
    max_events: int = 1_000,
    rank_timeout: float | None = None,
    name: str | None = None,
    **sink_options: Any,
) -> Watcher:
    """Attach lstmwatch to every nn.LSTM (and nn.GRU, nn.LSTMCell, nn.GRUCell) inside `model`; returns the Watcher."""
    from .sinks import check_options, make_sinks

    # Under torch.distributed only rank 0 prints, streams and writes (a W&B run often exists on rank 0 alone);
    # the others check the options' names, so that a typo fails on every rank instead of leaving them waiting.
    if world()[0] == 0:
        sinks = make_sinks(console=console, **sink_options)
    else:
        check_options(**sink_options)
        sinks = []
    if detectors is None:
        dets = default_detectors()
    elif isinstance(detectors, dict):
        dets = default_detectors(**detectors)  # tune the defaults: {"stalled_loss": {"patience": 500}}
    else:
        dets = Detectors(detectors)
    return Watcher(model, log_every=log_every, sample=sample, modules=modules, detectors=dets, sinks=sinks,
                   scaler=scaler, max_records=max_records, max_events=max_events, rank_timeout=rank_timeout,
                   name=name, quiet=not console)
