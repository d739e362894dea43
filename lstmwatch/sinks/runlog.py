"""The run log: every record and event of a run, one JSON line each, in a file `lstmwatch.load` reads back."""

from __future__ import annotations

import os
import time
import weakref
from pathlib import Path
from typing import IO, Any

from ..events import Event, Record
from ..runlog import end_line, event_line, header_line, record_line


class RunLogSink:
    """Writes `<log_dir>/<YYYYmmdd-HHMMSS>-<pid>.jsonl` (or `path`), flushed on every logging step."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None):
        if (log_dir is None) == (path is None):
            raise ValueError("RunLogSink needs exactly one of log_dir= (a folder, one new file per run) or path=")
        # Fail at watch() time, not at the first logging step, on a folder that cannot be written.
        folder = Path(log_dir) if log_dir is not None else Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"lstmwatch cannot write its run log into {folder}")
        self._dir = Path(log_dir) if log_dir is not None else None
        # Final once the file is opened in start(): a name taken in the same second gets a suffix.
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        self.path = Path(path) if path is not None else self._dir / name
        self._file: IO[str] | None = None
        self._modules: tuple[str, ...] = ()
        self._watcher: weakref.ref | None = None
        self.closed = False

    def start(self, watcher: Any) -> None:
        """Create the file and write the header: versions and each watched module's configuration."""
        self._watcher = weakref.ref(watcher)  # no cycle: the watcher holds its sinks
        probes = getattr(watcher, "probes", [])
        self._modules = tuple(p.name for p in probes)
        clock = getattr(watcher, "clock", None)
        self._open(header_line([{"name": p.name, "kind": p.kind, **p.describe()} for p in probes],
                               log_every=getattr(watcher, "log_every", None),
                               sample=getattr(clock, "sample", None)))

    def write(self, record: Record) -> None:
        """One line per record, flushed: a crash loses at most the line being written."""
        if self.closed:
            return
        if self._file is None:  # used without a Watcher: a header without modules
            self._modules = tuple(record.modules)
            self._open(header_line([{"name": m} for m in record.modules]))
        self._file.write(record_line(record, self._modules))
        self._file.flush()

    def emit(self, event: Event) -> None:
        """One line per event, flushed."""
        if self.closed or self._file is None:
            return
        self._file.write(event_line(event))
        self._file.flush()

    def close(self) -> None:
        """The closing line (how many steps were watched), then close the file; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._file is None:
            return
        watcher = self._watcher() if self._watcher is not None else None
        steps = getattr(watcher, "step_count", None)
        if isinstance(steps, int):
            self._file.write(end_line(steps))
        self._file.close()

    def __repr__(self) -> str:
        return f"RunLogSink({str(self.path)!r})"

    def _open(self, header: str) -> None:
        if self._dir is None:
            self._file = open(self.path, "w", encoding="utf-8")  # an explicit path: a new run replaces it
        else:
            stem, n = self.path.stem, 1
            while True:
                try:
                    self._file = open(self.path, "x", encoding="utf-8")
                    break
                except FileExistsError:
                    n += 1
                    self.path = self._dir / f"{stem}-{n}.jsonl"
        self._file.write(header)
        self._file.flush()
