"""Reading run logs back: `load` a file (or a folder's newest run) into a Run, and the one rule that says
which log in a folder is the newest, used by `lstmwatch.load` and the CLI alike.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..run import Run
from .format import MAX_LINE, BadLine, clip, decode_end, decode_event, decode_header, decode_record, parse_line, short

__all__ = ["load", "newest", "run_logs"]

# The writer's own names: <YYYYmmdd-HHMMSS>-<pid>.jsonl, then -2, -3, ... for runs started in the same second.
_WRITER_NAME = re.compile(r"^\d{8}-\d{6}-\d+(?:-(\d+))?\.jsonl$")
_HEADER_MAX = 1 << 20  # bytes of a first line read to find a header; a header is a few kB


def run_logs(folder: str | os.PathLike) -> list[Path]:
    """The lstmwatch run logs (*.jsonl whose first line is a header) in a folder, the newest run last.

    Newest means started last, by the start time the header records (`created`): it travels with the file
    through copies and renames, where a modification time is reset by copying and moves on while a run
    still writes, and where names sort wrongly (`-10` before `-9`, `-2` before its first run) or say
    nothing (`log_path=`, files people name). Runs started in the same second are ordered by the writer's
    `-2`, `-3` suffix, then by modification time; a header without a start time falls back on the latter.
    """
    found: list[tuple[tuple[float, int, int, str], Path]] = []
    for path in Path(folder).glob("*.jsonl"):
        try:
            key = _age(path)
        except OSError:  # unreadable: not a run this reader could load
            continue
        if key is not None:
            found.append((key, path))
    return [p for _, p in sorted(found, key=lambda kp: kp[0])]


def newest(folder: str | os.PathLike) -> Path:
    """The newest run log in a folder (see run_logs); FileNotFoundError when there is none."""
    logs = run_logs(folder)
    if not logs:
        raise FileNotFoundError(f"no lstmwatch run log (*.jsonl) in {folder}")
    return logs[-1]


def _age(path: Path) -> tuple[float, int, int, str] | None:
    """A run log's sort key (start time, same-second suffix, modification time, name), or None if the path
    is no run log (a folder, a file whose first line is no lstmwatch header)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        first = f.readline(_HEADER_MAX)
    try:
        obj = parse_line(first)
    except BadLine:
        return None
    if obj.get("type") != "header":
        return None
    mtime = path.stat().st_mtime_ns
    try:
        started = datetime.fromisoformat(str(obj["created"])).timestamp()
    except (KeyError, ValueError, OverflowError):
        started = mtime / 1e9
    m = _WRITER_NAME.match(path.name)
    return started, int(m.group(1) or 1) if m else 1, mtime, path.name


def load(path: str | os.PathLike) -> Run:
    """Read a run log (or a folder's newest) back; a last line cut off by a crash is dropped, not an error.

    Any other line that is not what lstmwatch writes is a ValueError naming the file and the line, its
    message a few hundred characters at most. The file is read a line at a time, none longer than
    format.MAX_LINE (16 MiB): what a hostile file costs in memory is bounded by that, not by its size.
    """
    path = Path(path)
    if path.is_dir():
        path = newest(path)
    with open(path, "rb") as f:  # FileNotFoundError as is
        return _read(f, path)


def _read(f: BinaryIO, path: Path) -> Run:
    """The lines of an open log, MAX_LINE bytes at most each, as a Run."""
    run: Run | None = None
    n = 0
    while raw := f.readline(MAX_LINE + 1):
        n += 1
        # A line with no newline ends the file (the writer never finished it: a crash cut it off), or is longer
        # than any the writer makes: none is, so that is an error wherever the line stands.
        last = not raw.endswith(b"\n")
        if len(raw) > MAX_LINE and last:
            raise ValueError(f"lstmwatch run log {path}, line {n}: longer than {MAX_LINE >> 20} MiB, where a run's "
                             "longest lines are a few hundred kB: not an lstmwatch run log")
        if not raw.strip():
            continue
        try:
            obj = parse_line(raw)
            kind: Any = obj.get("type")
            if run is None:
                if kind != "header":
                    raise BadLine(f"the first line should be the header (type 'header'), got type {short(kind)}: "
                                  "is this an lstmwatch run log?")
                run = Run(decode_header(obj), complete=False, path=path)
                names = tuple(m["name"] for m in run.header.get("modules", []))
            elif kind == "header":
                raise BadLine("a second header: two runs written into one file")
            elif kind == "record":
                run.records.append(decode_record(obj, names))
            elif kind == "event":
                run.events.append(decode_event(obj))
            elif kind == "end":
                run.steps, run.complete = decode_end(obj), True
            elif not isinstance(kind, str):
                raise BadLine(f"no line type (a 'type' string), got {short(kind)}")
            # A line type from a newer lstmwatch is skipped: the lines this one knows still read.
        except BadLine as exc:
            if last:  # cut off mid-line by a crash: keep everything up to the last complete line
                break
            raise ValueError(f"lstmwatch run log {path}, line {n}: {clip(str(exc), 400)}") from None
    if run is None:
        raise ValueError(f"lstmwatch run log {path}: no header line; the file is empty or not an lstmwatch run log")
    return run

