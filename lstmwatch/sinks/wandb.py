"""Weights & Biases: scalars under `lstmwatch/`, events as a table, the summary and alerts; wandb imported here only."""

from __future__ import annotations

import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .. import keys
from ..events import Event, LSTMWatchWarning
from ..frames import user_stacklevel
from ..interfaces import Header, Summary
from ..record import Record

PREFIX = "lstmwatch/"
STEP = PREFIX + "step"  # lstmwatch's own x-axis: the training step of the record
EVENTS = PREFIX + "events"
COLUMNS = ["step", "kind", "severity", "module", "message", "hint"]
MAX_KEYS = 1000  # statistics per log at most: W&B's UI and size limits stay far away on any model
_ALERT_LEVEL = {"warning": "WARN", "error": "ERROR"}


def import_wandb() -> Any:
    """The wandb package, or an ImportError that says how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("lstmwatch.watch(..., wandb=...) needs the wandb package: "
                          "pip install 'lstmwatch[wandb]'") from exc
    return wandb


def key_filter(wanted: str | Sequence[str] | None) -> Callable[[str], bool]:
    """`stats key -> bool` for wandb_keys: None (all but per-parameter norms), "all", or glob patterns."""
    if wanted is None:
        # '<module>/weight_ih_l0/grad_norm': one per parameter, left out unless asked for (wandb_keys="all").
        return lambda k: keys.parse(k).kind != "param"
    if wanted == "all":
        return lambda k: True
    given: list[object] = [wanted] if isinstance(wanted, str) else list(wanted) if isinstance(
        wanted, (list, tuple, set)) else [wanted]
    pats = [p for p in given if isinstance(p, str)]
    if len(pats) != len(given):
        raise TypeError(f"wandb_keys must be None, 'all' or glob patterns of statistic names, got {wanted!r}")
    return lambda k: any(fnmatch.fnmatchcase(k, p) for p in pats)


class WandbSink:
    """Streams into a W&B run the user started; never starts, logs in to, or finishes one itself."""

    def __init__(self, run: Any = None, *, keys: str | Sequence[str] | None = None, max_keys: int = MAX_KEYS):
        wandb = import_wandb()
        if run is None:
            run = wandb.run
            if run is None:
                raise RuntimeError("lstmwatch.watch(..., wandb=True) logs into the active W&B run and there is "
                                   "none: call wandb.init(...) before lstmwatch.watch(), or pass the run: wandb=run")
        elif not callable(getattr(run, "log", None)) or not callable(getattr(run, "define_metric", None)):
            raise TypeError(f"wandb= takes True or a run from wandb.init(), got {type(run).__name__}")
        if getattr(run, "_is_finished", False) is True:
            raise ValueError("the W&B run given to lstmwatch.watch(..., wandb=run) is already finished")
        self.run = run
        self._wandb = wandb
        self._want = key_filter(keys)
        self.max_keys = max_keys
        self._warned = False
        self._online = not (getattr(run, "offline", False) is True or getattr(run, "disabled", False) is True)
        self._table: Any = None
        self._unlogged = 0  # event rows not yet logged with the table
        self._pending: int | None = None  # the W&B step of the row our last values wait in, uncommitted
        self.events_count = 0
        self._kinds: Counter[str] = Counter()
        self._started = False
        self.closed = False

    def start(self, header: Header | None = None) -> None:
        """Bind every lstmwatch/ key to lstmwatch's own step metric, so charts use the training step."""
        self._started = True
        if header is not None and header.name:
            self.run.summary[PREFIX + "name"] = header.name
        self.run.define_metric(STEP)
        self.run.define_metric(PREFIX + "*", step_metric=STEP)

    def write(self, record: Record, events: Sequence[Event] = ()) -> None:
        """The record's scalars under lstmwatch/ and its events, merged into one row."""
        for event in events:
            self.emit(event)
        if self._finished():
            return
        if not self._started:  # used without a Watcher
            self.start()
        data: dict[str, Any] = {STEP: record.step}
        # Run-wide statistics first, so the loss and total norm survive the cap.
        names = [k for k in sorted(record.stats, key=lambda k: keys.parse(k).kind != "run") if self._want(k)]
        if len(names) > self.max_keys:
            if not self._warned:
                self._warned = True
                warnings.warn(f"lstmwatch: {len(names)} statistics per step, W&B gets the first {self.max_keys}; "
                              "choose them with watch(..., wandb_keys=[glob patterns])", LSTMWatchWarning,
                              stacklevel=user_stacklevel())
            names = names[:self.max_keys]
        data.update({PREFIX + k: record.stats[k] for k in names})
        # Curves (one value per timestep) stay out: a list per step is not a W&B scalar.
        self._add_table(data)
        self._log(data)

    def emit(self, event: Event) -> None:
        """A row of the lstmwatch/events table (logged with the next row), the run summary, and an alert when
        the run is online."""
        if self._table is None:
            self._table = self._new_table()
        row = [event.step, event.kind, event.severity, event.module, event.message, event.hint]
        self._table.add_data(*row)
        self._unlogged += 1
        self.events_count += 1
        self._kinds[event.kind] += 1
        if self._finished():
            return
        s = self.run.summary
        s[PREFIX + "events_count"] = self.events_count
        s[PREFIX + "events_by_kind"] = dict(self._kinds)
        s[PREFIX + "last_event"] = dict(zip(COLUMNS, row))
        if self._online and event.severity in _ALERT_LEVEL:
            where = f" in {event.module}" if event.module else ""
            self.run.alert(title=f"lstmwatch: {event.kind}{where}"[:63], level=_ALERT_LEVEL[event.severity],
                           text=f"step {event.step}: {event.message}\nfix: {event.hint}")

    def close(self, summary: Summary | None = None) -> None:
        """Log the events emitted since the last logging step; the run itself stays open (it is the user's)."""
        if self.closed:
            return
        self.closed = True
        if self._unlogged and not self._finished():
            data: dict[str, Any] = {}
            self._add_table(data)
            self._log(data)

    # --- internals
    def _new_table(self) -> Any:
        try:
            # Each log sends only the rows added since the previous one.
            return self._wandb.Table(columns=COLUMNS, log_mode="INCREMENTAL")
        except TypeError:  # wandb < 0.19: a table is immutable once logged; _add_table logs a fresh copy
            return self._wandb.Table(columns=COLUMNS)

    def _add_table(self, data: dict[str, Any]) -> None:
        # The rows of events not yet logged: those of this record, and any emitted since the last log.
        if not self._unlogged:
            return
        t = self._table
        if getattr(t, "log_mode", None) != "INCREMENTAL":
            t = self._wandb.Table(columns=COLUMNS, data=[list(r) for r in self._table.data])
        data[EVENTS] = t
        self._unlogged = 0

    def _log(self, data: dict[str, Any]) -> None:
        # W&B's step (`_step`) is the row index of the run's history, and it belongs to the user: each of
        # their run.log() calls without step= adds one, or they set it with step=. A row of our own
        # (commit=True) would advance it: their implicit steps would count our rows too, and a later
        # run.log(..., step=s) for the step they are on would be dropped as out of order. So our values
        # join the row the user is filling (commit=False, as wandb.watch does) and are plotted against
        # lstmwatch/step, not _step. One exception: when the user has not committed a row since our
        # last log (they log less often than lstmwatch, or not at all), that row still holds our previous
        # values, which this log would overwrite: we commit it first, so no point of ours is ever lost.
        step = self._step()
        if step is not None and step == self._pending:
            self.run.log({}, commit=True)
            step = self._step()
        self.run.log(data, commit=False)
        self._pending = step

    def _step(self) -> int | None:
        """The W&B step of the row being filled; None where it cannot be known (shared mode)."""
        local = getattr(self.run, "_local_step", None)  # the client's count: no round trip to the service
        if isinstance(local, int):
            return local
        try:
            step = self.run.step
        except Exception:  # noqa: BLE001 - mode="shared" runs refuse it: merge into the row, as wandb.watch
            return None
        return step if isinstance(step, int) else None

    def _finished(self) -> bool:
        # The user finished the run before closing the watcher: nothing more can go in; stay quiet.
        return getattr(self.run, "_is_finished", False) is True
