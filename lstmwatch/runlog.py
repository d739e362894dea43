"""The run log: one JSON Lines file per run, written by the run-log sink and read back by `load`.

Line 1 is the header (`type: header`: versions, each watched module's configuration), then one line
per record (`type: record`) and per event (`type: event`) in the order they happened, and a closing
line (`type: end`) when the watcher was closed. Statistics only: no line holds a sample of the data.
JSON has no NaN or Inf, so non-finite numbers are written as the strings "nan", "inf" and "-inf".
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .events import Event, Record

FORMAT = 1  # the version of this layout; bumped when a reader of the old one would misread a new file
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SEVERITIES = ("info", "warning", "error")


# --- writing
def number(x: Any) -> Any:
    """A number as JSON can hold it: non-finite floats as "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def plain(x: Any) -> Any:
    """Any configuration value as plain JSON: containers walked, non-finite floats spelled, the rest str()."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return number(x)
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return str(x)


def dumps(obj: dict) -> str:
    """One line of the log; allow_nan=False guarantees what is written is standard JSON."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"


def header_line(modules: list[dict], log_every: Any = None, sample: int | None = None) -> str:
    """The first line: versions and each watched module's configuration (name, kind, describe())."""
    import torch

    from . import __version__

    return dumps(plain({
        "type": "header", "format": FORMAT, "lstmwatch": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "pid": os.getpid(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "log_every": log_every if isinstance(log_every, int) and not isinstance(log_every, bool) else None,
        "sample": sample, "modules": modules,
    }))


def record_line(record: Record, modules: tuple[str, ...] | None = None) -> str:
    """A record; its module names are left out when they are the header's (`modules`)."""
    obj: dict[str, Any] = {
        "type": "record", "step": record.step, "loss": number(record.loss), "val_loss": number(record.val_loss),
        "stats": {k: number(v) for k, v in record.stats.items()},
        "curves": {k: [number(v) for v in c] for k, c in record.curves.items()},
    }
    if tuple(record.modules) != tuple(modules or ()):
        obj["modules"] = list(record.modules)
    return dumps(obj)


def event_line(event: Event) -> str:
    return dumps({"type": "event", "step": event.step, "kind": event.kind, "severity": event.severity,
                  "module": event.module, "message": event.message, "hint": event.hint})


def end_line(steps: int) -> str:
    """The closing line: the watcher was closed after `steps` steps (a log without it was cut short)."""
    return dumps({"type": "end", "steps": steps})


# --- reading
@dataclass
class Run:
    """A run read back from its log: the header, the records and the events, in order."""

    path: Path
    header: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    complete: bool = False  # the log ends with its closing line: the watcher was closed, nothing was cut off
    steps: int | None = None  # steps watched, from the closing line

    @property
    def modules(self) -> list[str]:
        """Qualified names of the watched modules."""
        return [m["name"] for m in self.header.get("modules", [])]

    @property
    def configs(self) -> dict[str, dict[str, Any]]:
        """Each watched module's configuration, by qualified name."""
        return {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in self.header.get("modules", [])}

    @property
    def latest(self) -> Record | None:
        """The last record, or None if none was written."""
        return self.records[-1] if self.records else None

    @property
    def step_count(self) -> int:
        """Steps watched: from the closing line, or the last logged step of a log cut short."""
        if self.steps is not None:
            return self.steps
        return max([r.step for r in self.records] + [e.step for e in self.events] + [0])

    def diagnose(self) -> list:
        """The run's events ranked by likely root cause, as Watcher.diagnose()."""
        from .diagnose import diagnose

        return diagnose(self.events)

    def summary(self) -> str:
        """The diagnosis as text for people, as Watcher.summary()."""
        from .diagnose import summary

        return summary(self.diagnose(), steps=self.step_count, modules=self.modules)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "cut short"
        return (f"Run({self.path.name}: {', '.join(self.modules)}; {len(self.records)} records, "
                f"{len(self.events)} events; {state})")


class _Bad(ValueError):
    """A malformed line; load() adds the file and line number."""


def _num(x: Any, what: str, optional: bool = False) -> float | int | None:
    if x is None and optional:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise _Bad(f"{what} should be a number, got {x!r}")
    if isinstance(x, str):
        if x.lower() not in _NONFINITE:
            raise _Bad(f"{what} should be a number, got the string {x!r}")
        return _NONFINITE[x.lower()]
    return x


def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise _Bad(f"{what} should be an integer, got {x!r}")
    return x


def _str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise _Bad(f"{what} should be a string, got {x!r}")
    return x


def _dict(x: Any, what: str) -> dict:
    if not isinstance(x, dict):
        raise _Bad(f"{what} should be an object, got {type(x).__name__}")
    return x


def _record(obj: dict, modules: tuple[str, ...]) -> Record:
    stats = {_str(k, "a stats key"): _num(v, f"stats[{k!r}]") for k, v in _dict(obj.get("stats"), "stats").items()}
    curves = {}
    for k, c in _dict(obj.get("curves", {}), "curves").items():
        if not isinstance(c, list):
            raise _Bad(f"curves[{k!r}] should be a list, got {type(c).__name__}")
        curves[k] = [_num(v, f"curves[{k!r}]") for v in c]
    mods = obj.get("modules")
    if mods is not None and not (isinstance(mods, list) and all(isinstance(m, str) for m in mods)):
        raise _Bad(f"modules should be a list of names, got {mods!r}")
    return Record(step=_int(obj.get("step"), "step"), loss=_num(obj.get("loss"), "loss", optional=True),
                  stats=stats, curves=curves, val_loss=_num(obj.get("val_loss"), "val_loss", optional=True),
                  modules=tuple(mods) if mods is not None else modules)


def _event(obj: dict) -> Event:
    severity = _str(obj.get("severity"), "severity")
    if severity not in _SEVERITIES:
        raise _Bad(f"severity should be one of {', '.join(_SEVERITIES)}, got {severity!r}")
    return Event(step=_int(obj.get("step"), "step"), kind=_str(obj.get("kind"), "kind"), severity=severity,
                 module=_str(obj.get("module"), "module"), message=_str(obj.get("message"), "message"),
                 hint=_str(obj.get("hint"), "hint"))


def _header(obj: dict) -> dict:
    fmt = obj.get("format")
    if isinstance(fmt, int) and fmt > FORMAT:
        raise _Bad(f"written in run log format {fmt} by a newer lstmwatch ({obj.get('lstmwatch')}); "
                   f"this one reads format {FORMAT}: upgrade lstmwatch")
    mods = obj.get("modules", [])
    if not isinstance(mods, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in mods):
        raise _Bad("modules should be a list of objects, each with a name")
    return obj


def latest(folder: str | os.PathLike) -> Path:
    """The newest run log in a log_dir (names start with their time)."""
    logs = sorted(Path(folder).glob("*.jsonl"))
    if not logs:
        raise FileNotFoundError(f"no lstmwatch run log (*.jsonl) in {folder}")
    return logs[-1]


def load(path: str | os.PathLike) -> Run:
    """Read a run log (or a log_dir's newest) back; a last line cut off by a crash is dropped, not an error."""
    path = Path(path)
    if path.is_dir():
        path = latest(path)
    with open(path, "rb") as f:  # FileNotFoundError as is
        data = f.read()
    lines = data.split(b"\n")
    # What follows the last newline is a line the writer never finished: a crash cut it off.
    tail = lines.pop()
    run: Run | None = None
    for n, raw in enumerate([*lines, tail], 1):
        last = n == len(lines) + 1
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _Bad(f"not valid JSON ({exc})") from None
            kind = _dict(obj, "a line").get("type")
            if run is None:
                if kind != "header":
                    raise _Bad(f"the first line should be the header (type 'header'), got type {kind!r}: "
                               "is this an lstmwatch run log?")
                run = Run(path, _header(obj))
            elif kind == "header":
                raise _Bad("a second header: two runs written into one file")
            elif kind == "record":
                run.records.append(_record(obj, tuple(run.modules)))
            elif kind == "event":
                run.events.append(_event(obj))
            elif kind == "end":
                run.steps, run.complete = _int(obj.get("steps"), "steps"), True
            elif not isinstance(kind, str):
                raise _Bad(f"no line type (a 'type' string), got {kind!r}")
            # A line type from a newer lstmwatch is skipped: the lines this one knows still read.
        except _Bad as exc:
            if last:  # cut off mid-line by a crash: keep everything up to the last complete line
                break
            raise ValueError(f"lstmwatch run log {path}, line {n}: {exc}") from None
    if run is None:
        raise ValueError(f"lstmwatch run log {path}: no header line; the file is empty or not an lstmwatch run log")
    return run
