"""The run log's line layout: how a header, a record, an event and the closing line are encoded as JSON
lines, and decoded and checked when read back.

Line 1 is the header (`type: header`: versions, settings, each watched module's configuration), then one
line per record (`type: record`) and per event (`type: event`) in the order they happened, and a closing
line (`type: end`) when the watcher was closed. Statistics only: no line holds a sample of the data.
JSON has no NaN or Inf, so non-finite numbers are written as the strings "nan", "inf" and "-inf".

A reader skips the keys and line types it does not know, so adding a key (as events' `where` and `values`
were) keeps the format number; it is bumped only when a reader of the old layout would misread a new file.

No line is longer than MAX_LINE (16 MiB), so a reader holds at most one such line and its objects in memory
whatever file it is given. A record line of a real run is a few hundred kB at most: its size is set by the
per-timestep curves, about 23 bytes per timestep per layer and direction, and a 4-layer bidirectional LSTM
with T=1000 writes 212 kB (11 kB of statistics, 201 kB of curves). 16 MiB is 80 times that, room for such a
stack at T=80,000 or for ten of them at T=8,000. A record whose line would still be longer is written without
its curves (`curves_omitted`: how many were left out), so every log the writer makes can be read back.
A line that fails to decode is reported by what it holds, never with a whole value: `short` bounds each one.
"""

from __future__ import annotations

import json
import math
import reprlib
import sys
from collections.abc import Mapping
from typing import Any

from ..events import Event, Severity
from ..interfaces import Header
from ..record import Record

FORMAT = 1  # the version of this layout
# The header's keys in the order they are written (readers do not care; people reading the file do).
HEADER_ORDER = ("lstmwatch", "torch", "python", "pid", "created", "log_every", "sample", "modules", "world_size",
                "name")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")
MAX_LINE = 16 * 1024 * 1024  # bytes of one line, its newline aside (see above)
_STEP_MAX = 2**63  # a step count beyond any run
_FLOAT_MAX = int(sys.float_info.max)  # an integer past it is no statistic


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 2, 4, 3, 40, 40, 40
    return r


_REPR = _bounded_repr()


def clip(text: str, limit: int = 80) -> str:
    """A text cut to at most `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(x: Any) -> str:
    """A value's repr for an error message, at most 80 characters whatever its size or depth."""
    try:
        return clip(_REPR.repr(x))
    except ValueError:  # an int past Python's digit limit
        return "<an integer of too many digits to print>"


# --- encoding
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


def dumps(obj: dict[str, Any]) -> str:
    """One line of the log; allow_nan=False guarantees what is written is standard JSON."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"


def header_line(header: Header | Mapping[str, Any]) -> str:
    """The first line: the header's values (versions, settings, modules as {'name', 'kind', **config})."""
    values = header.as_dict() if isinstance(header, Header) else dict(header)
    ordered = {k: values[k] for k in HEADER_ORDER if k in values}
    ordered.update(values)  # keys this layout does not list come last
    return dumps(plain({"type": "header", "format": FORMAT, **ordered}))


def record_line(record: Record, modules: tuple[str, ...] = ()) -> str:
    """A record; its module names are left out when they are the header's (`modules`)."""
    obj: dict[str, Any] = {
        "type": "record", "step": record.step, "loss": number(record.loss), "val_loss": number(record.val_loss),
        "stats": {k: number(v) for k, v in record.stats.items()},
        "curves": {k: [number(v) for v in c] for k, c in record.curves.items()},
    }
    if tuple(record.modules) != tuple(modules):
        obj["modules"] = list(record.modules)
    line = dumps(obj)
    if len(line) > MAX_LINE + 1 and obj["curves"]:  # curves of a very long sequence: the statistics still fit
        obj["curves_omitted"], obj["curves"] = len(obj["curves"]), {}
        line = dumps(obj)
    return line


def event_line(event: Event) -> str:
    """An event: what was found, where, what was measured, and the fix."""
    return dumps({"type": "event", "step": event.step, "kind": event.kind, "severity": event.severity,
                  "module": event.module, "message": event.message, "hint": event.hint, "where": event.where,
                  "values": {k: number(v) for k, v in event.values.items()}})


def end_line(steps: int) -> str:
    """The closing line: the watcher was closed after `steps` steps (a log without it was cut short)."""
    return dumps({"type": "end", "steps": steps})


# --- decoding
class BadLine(ValueError):
    """A malformed line; the reader adds the file and line number."""


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise BadLine(f"{what} should be a number, got {short(x)}")
    if isinstance(x, str):
        if x.lower() not in _NONFINITE:
            raise BadLine(f"{what} should be a number, got the string {short(x)}")
        return _NONFINITE[x.lower()]
    if isinstance(x, int) and not -_FLOAT_MAX <= x <= _FLOAT_MAX:
        raise BadLine(f"{what} is an integer beyond the range of a float")
    return x


def _optional_num(x: Any, what: str) -> float | None:
    return None if x is None else _num(x, what)


def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not -_STEP_MAX < x < _STEP_MAX:
        raise BadLine(f"{what} should be an integer (below 2**63), got {short(x)}")
    return x


def _str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise BadLine(f"{what} should be a string, got {short(x)}")
    return x


def _dict(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise BadLine(f"{what} should be an object, got {type(x).__name__}")
    return x


def parse_line(raw: bytes) -> dict[str, Any]:
    """One line as its JSON object; a line no run log holds (not UTF-8, not JSON, nested past Python's
    recursion limit, an integer past its digit limit) is a BadLine saying why, briefly."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise BadLine("not a run log line: JSON nested too deep to read") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, the int-digits limit: bounded messages
        raise BadLine(f"not valid JSON ({clip(str(exc), 200)})") from None
    return _dict(obj, "a line")


def decode_header(obj: dict[str, Any]) -> dict[str, Any]:
    """The header as read, checked: a format this reader knows, modules as a list of named objects."""
    fmt = obj.get("format")
    if isinstance(fmt, int) and fmt > FORMAT:
        raise BadLine(f"written in run log format {short(fmt)} by a newer lstmwatch "
                      f"({short(obj.get('lstmwatch'))}); "
                      f"this one reads format {FORMAT}: upgrade lstmwatch")
    mods = obj.get("modules", [])
    if not isinstance(mods, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str) for m in mods):
        raise BadLine("modules should be a list of objects, each with a name")
    return obj


def decode_record(obj: dict[str, Any], modules: tuple[str, ...]) -> Record:
    """A record line; `modules` (the header's) when the line names none."""
    stats = {_str(k, "a stats key"): _num(v, f"stats[{short(k)}]")
             for k, v in _dict(obj.get("stats"), "stats").items()}
    curves = {}
    for k, c in _dict(obj.get("curves", {}), "curves").items():
        what = f"curves[{short(k)}]"
        if not isinstance(c, list):
            raise BadLine(f"{what} should be a list, got {type(c).__name__}")
        curves[k] = [_num(v, what) for v in c]
    mods = obj.get("modules")
    if mods is not None and not (isinstance(mods, list) and all(isinstance(m, str) for m in mods)):
        raise BadLine(f"modules should be a list of names, got {short(mods)}")
    return Record(step=_int(obj.get("step"), "step"), loss=_optional_num(obj.get("loss"), "loss"),
                  stats=stats, curves=curves, val_loss=_optional_num(obj.get("val_loss"), "val_loss"),
                  modules=tuple(mods) if mods is not None else modules)


def decode_event(obj: dict[str, Any]) -> Event:
    """An event line; one written before events had `where` and `values` reads with '' and {}."""
    severity = _str(obj.get("severity"), "severity")
    if severity not in _SEVERITIES:
        raise BadLine(f"severity should be one of {', '.join(_SEVERITIES)}, got {short(severity)}")
    values = {_str(k, "a values key"): _num(v, f"values[{short(k)}]")
              for k, v in _dict(obj.get("values", {}), "values").items()}
    return Event(step=_int(obj.get("step"), "step"), kind=_str(obj.get("kind"), "kind"),
                 severity=_SEVERITIES[_SEVERITIES.index(severity)],  # typed as the Severity literal
                 module=_str(obj.get("module"), "module"), message=_str(obj.get("message"), "message"),
                 hint=_str(obj.get("hint"), "hint"), where=_str(obj.get("where", ""), "where"), values=values)


def decode_end(obj: dict[str, Any]) -> int:
    """The closing line's step count."""
    return _int(obj.get("steps"), "steps")
