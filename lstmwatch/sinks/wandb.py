"""Weights & Biases: scalars under `lstmwatch/`, events as a table, the summary and alerts; wandb imported here only."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
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
MAX_HELD = 100  # records waiting for the user's row at most: beyond, the oldest is placed without it
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
    """Streams into a W&B run the user started; never starts, logs in to, or finishes one itself.

    Given the watcher's clock (`follow`), each record goes into the W&B row of the user's own values of the
    same training step, whether they log before or after `watcher.step()`, with `step=` or without.
    """

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
        # (W&B step, training step) of the row our last values wait in, uncommitted
        self._pending: tuple[int, int | None] | None = None
        # With the watcher's clock (follow), each record goes into the row of the user's values of its step.
        self._clock: Any = None
        self._own_log: Any = None  # our stand-in for the run's _log while it is installed
        self._prior: Any = None  # the run's _log, which ours calls
        self._had: Any = None  # the run's own stand-in for _log before ours, if it had one
        self._user: tuple[int, int] | None = None  # (W&B step, training step) of the user's latest row
        self._explicit = False  # the user numbers the rows (step=): lstmwatch never commits one then
        self._steady: bool | None = None  # whether the user's step= grew at least as fast as the training step
        self._held: list[tuple[int, dict[str, Any]]] = []  # records waiting for the user's row of their step
        self._owed = False  # a commit of the user's, held back until this step's record joins their row
        self._writing = False  # our own run.log call is under way: the stand-in lets it through
        self._crowded = False  # said once: a record had no row of its own
        self.events_count = 0
        self._kinds: Counter[str] = Counter()
        self._started = False
        self.closed = False

    def follow(self, clock: Any) -> None:
        """Take the watcher's clock: each record then goes into the W&B row of the user's values of its step.

        W&B's rows are the user's, and every one of their log calls (`wandb.log`, `run.log`) goes through
        `run._log`: we stand in for it on this run while the sink is open, to see which row each call fills
        and which training step its values are of. A wandb without `_log` keeps the plain merge (`_log`).
        """
        run = self.run
        if self._own_log is not None or not isinstance(getattr(run, "_local_step", None), int):
            return
        prior = getattr(run, "_log", None)
        if not callable(prior) or not hasattr(run, "__dict__"):
            return
        self._prior, self._had, own = prior, vars(run).get("_log"), self._user_log
        try:
            run._log = own
        except Exception:  # noqa: BLE001 - a run that takes no attribute: the plain merge
            return
        self._own_log, self._clock = own, clock
        # wandb.finish() before watcher.close(): the records still held go in first, while the run takes logs.
        hooks = getattr(run, "_teardown_hooks", None)
        if isinstance(hooks, list):
            try:
                from wandb.sdk.wandb_run import TeardownHook, TeardownStage

                hooks.append(TeardownHook(self._on_finish, TeardownStage.EARLY))
            except Exception:  # noqa: BLE001 - another wandb: records held at finish() are left out
                pass

    def _on_finish(self) -> None:
        """The user finishes the run before closing the watcher: this sink closes first (never in their way)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - wandb.finish() must finish whatever happens here
            self._unwrap()

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
        if self._clock is None:
            self._drain()
            self._log(data)
        else:
            self._place(record.step, data)

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
        if not self._finished():
            self._pay()
            data: dict[str, Any] = {}
            self._add_table(data)
            if self._held:
                self._held[-1][1].update(data)
            elif data and self._explicit:
                self._write_row(data)  # the user numbers the rows: none of ours among them
            elif data:
                self._log(data)
            self._drain()
        self._held = []
        self._unwrap()

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
        # The plain merge, without the watcher's clock (a sink used alone, or a wandb without run._log).
        # W&B's step (`_step`) is the row index of the run's history, and it belongs to the user: each of
        # their run.log() calls without step= adds one, or they set it with step=. A row of our own
        # (commit=True) would advance it: their implicit steps would count our rows too, and a later
        # run.log(..., step=s) for the step they are on would be dropped as out of order. So our values
        # join the row the user is filling (commit=False, as wandb.watch does) and are plotted against
        # lstmwatch/step, not _step. One exception: when the user has not committed a row since our
        # last log (they log less often than lstmwatch, or not at all), that row still holds our previous
        # values, which this log would overwrite: we commit it first, so no point of ours is ever lost.
        step = self._step()
        if step is not None and self._pending is not None and step == self._pending[0]:
            self._write_row({}, commit=True)
        self._write_row(data)

    def _write_row(self, data: dict[str, Any], t: int | None = None, *, step: int | None = None,
                   commit: bool = False) -> None:
        """Our own run.log call (past our stand-in for the user's): `data`, of training step `t`."""
        self._writing = True
        try:
            self.run.log(data, commit=commit, **({} if step is None else {"step": step}))
        finally:
            self._writing = False
        at = self._step()
        self._pending = None if commit or at is None else (at, t)

    # --- with the watcher's clock: each record into the row of the user's values of its training step
    # W&B fills one row at a time, the open one (`_local_step`). A user's call without step= fills it and
    # commits it; one with step=s opens row s if s is higher (the open row is written), joins it if equal,
    # and is dropped if lower. So where the user gives step=, lstmwatch never commits a row, and puts a
    # record the user logs nothing for only in a row they have skipped, or will, their steps growing steadily.
    def _user_log(self, data: Any, step: Any = None, commit: Any = None, **more: Any) -> Any:
        """Stands in for `run._log`, which every log call of the user's goes through, while the sink is open."""
        if not (self._writing or self.closed or self._clock is None) and isinstance(data, Mapping):
            try:
                commit = self._before_user(step, commit)
            except Exception:  # noqa: BLE001 - never in the way of the user's call: back to the plain merge
                self._unwrap()
        return self._prior(data, step=step, commit=commit, **more)

    def _before_user(self, step: Any, commit: Any) -> Any:
        """Ahead of a user's log call: the held record of the step its values are of goes into its row."""
        self._pay()
        clock, t, at = self._clock, self._now(), self._at()
        if step is not None:
            self._explicit = True
            if step < at:
                return commit  # W&B drops it: no row of theirs
        elif not self._explicit and self._pending is not None and self._pending[0] == at and self._pending[1] != t:
            self._write_row({}, commit=True)  # our record of another step keeps its row
        self._settle(t, None if step is None else int(step))
        row = self._at() if step is None else int(step)
        if self._user is None or self._user[0] != row:  # their first values in this row
            if self._user is not None:
                self._steady = self._steady is not False and row - self._user[0] >= t - self._user[1]
            self._user = (row, t)
        if (commit or (step is None and commit is None)) and t == clock.step and clock.logging:
            # Values of the step in progress, whose record comes at watcher.step(): their row waits for it.
            self._owed = True
            return False
        return commit

    def _settle(self, t: int, step: int | None) -> None:
        """At a user's call with values of step `t` (into row `step`, None: the open row): the held record of
        `t` joins their row; older ones get rows of their own below it, as many steps below as they are older."""
        keep = []
        for h, values in self._held:
            if h == t:
                self._write_row(values, h, step=step)
                continue
            row = None if step is None else step - (t - h)
            if h > t or not self._alone(h, values, row, sys.maxsize if step is None else step):
                keep.append((h, values))
        self._held = keep

    def _place(self, t: int, data: dict[str, Any]) -> None:
        """The record of step `t`: into the user's open row of `t`; or held for their row of `t`, which opens
        next if they log after watcher.step(); or, where W&B counts the rows, into the open row."""
        if self._user == (self._at(), t):  # they log before watcher.step(): their row of t is open
            self._write_row(data, t)
            self._pay()
            return
        if self._user is not None:  # held records they have logged nothing of since: rows of their own
            self._held = self._own_rows(self._held)
        if self._user is None or self._explicit:
            # Before their first call, how they count rows is unknown: a row of ours could make W&B drop
            # their first step=. So records wait for it, MAX_HELD at most (then, a user logging nothing).
            self._held.append((t, data))
            if len(self._held) > MAX_HELD:
                self._release([self._held.pop(0)])
            return
        if self._full():  # values of another step: the user's next values of t go with ours in a new row
            self._owed = False
            self._write_row({}, commit=True)
        self._write_row(data, t)

    def _alone(self, t: int, data: dict[str, Any], row: int | None, below: int) -> bool:
        """The record of step `t`, which the user logs nothing of, in a row of its own: committed where W&B
        counts the rows; else at `row` if that holds nothing and is below `below`. False where there is none."""
        if not self._explicit:
            if self._full():
                self._write_row({}, commit=True)
            self._write_row(data, t, commit=True)
            return True
        if row is None or not self._at() + self._full() <= row < below:
            return False
        self._write_row(data, t, step=row)
        return True

    def _full(self) -> bool:
        """Whether the open row holds values already: ours or the user's."""
        at = self._at()
        return any(v is not None and v[0] == at for v in (self._pending, self._user))

    def _slope_row(self, t: int) -> int | None:
        """Step `t`'s row if the user's step= goes on growing at least as fast as the training step, as it has."""
        return None if self._user is None or not self._steady else self._user[0] + t - self._user[1]

    def _own_rows(self, held: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
        """Each held record in a row of its own where one is known (`_alone`); those left."""
        return [(t, values) for t, values in held if not self._alone(t, values, self._slope_row(t), sys.maxsize)]

    def _drain(self) -> None:
        """At close, or back to the plain merge: the held records, the user's last row behind them."""
        held, self._held = self._held, []
        self._release(held)

    def _release(self, held: list[tuple[int, dict[str, Any]]]) -> None:
        """Records placed without the user's row of their step: a row of their own where there is one."""
        for t, values in held:
            if self._clock is None:
                self._log(values)
            elif not self._alone(t, values, self._slope_row(t), sys.maxsize):
                self._crowd(t, values)

    def _crowd(self, t: int, data: dict[str, Any]) -> None:
        """No row of its own for the record of `t`: it joins the open row, whatever that holds."""
        if not self._crowded:
            self._crowded = True
            warnings.warn("lstmwatch: the steps given to wandb.log(step=...) grow slower than the training step, "
                          "leaving no W&B row for some of lstmwatch's records: they share rows with other values "
                          "and may replace one another there (the run log, log_dir=, keeps every record); log with "
                          "step=<the global step>, or without step=", LSTMWatchWarning, stacklevel=user_stacklevel())
        self._write_row(data, t)

    def _pay(self) -> None:
        """The user's commit held back for our record (`_before_user`)."""
        if self._owed:
            self._owed = False
            self._write_row({}, commit=True)

    def _now(self) -> int:
        """The training step of values logged now: the step in progress once it has trained, else the last one."""
        clock = self._clock
        return int(clock.step if clock.ran else clock.step - 1)

    def _at(self) -> int:
        """The W&B step of the open row (following, the run has `_local_step`)."""
        return int(self.run._local_step)

    def _unwrap(self) -> None:
        """The run's own `_log` back; records go the plain way from now on."""
        own, self._own_log, self._clock = self._own_log, None, None
        if own is not None and vars(self.run).get("_log") is own:
            if self._had is None:
                del self.run._log
            else:
                self.run._log = self._had

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
