"""The run log's writer: every record and event of a run, one JSON line each, in a file `lstmwatch.load`
reads back (the line layout is lstmwatch.runlog.format's)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..events import Event
from ..interfaces import Header, ModuleInfo, Summary
from ..record import Record
from ..runlog.format import end_line, event_line, header_line, record_line


class RunLogSink:
    """Writes `<log_dir>/<YYYYmmdd-HHMMSS>-<pid>.jsonl` (or `path`), flushed on every logging step."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None):
        if log_dir is not None and path is None:
            self._dir: Path | None = Path(log_dir)
            folder = self._dir
            # Final once the file is opened in start(): a name taken in the same second gets a suffix.
            self.path = self._dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        elif path is not None and log_dir is None:
            self._dir = None
            self.path = Path(path)
            folder = self.path.parent
        else:
            raise ValueError("RunLogSink needs exactly one of log_dir= (a folder, one new file per run) or path=")
        # Fail at watch() time, not at the first logging step, on a folder that cannot be written.
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"lstmwatch cannot write its run log into {folder}")
        self._file: IO[str] | None = None
        self._modules: tuple[str, ...] = ()
        self.closed = False

    def start(self, header: Header) -> None:
        """Create the file and write the header: versions, settings and each watched module's configuration."""
        self._modules = header.names
        self._file = self._open(header)

    def write(self, record: Record, events: Sequence[Event] = ()) -> None:
        """The record's line, then one line per event, flushed: a crash loses at most the step being written."""
        if self.closed:
            return
        if self._file is None:  # used without start(): a header naming the record's modules
            self._modules = tuple(record.modules)
            self._file = self._open(Header.of([ModuleInfo(m) for m in record.modules]))
        self._file.write(record_line(record, self._modules))
        for event in events:
            self._file.write(event_line(event))
        self._file.flush()

    def close(self, summary: Summary | None = None) -> None:
        """The closing line (how many steps were watched), then close the file; safe to call twice.
        Without a summary the log reads as cut short: nobody said how many steps the run had."""
        if self.closed:
            return
        self.closed = True
        if self._file is None:
            return
        if summary is not None:
            self._file.write(end_line(summary.steps))
        self._file.close()

    def __repr__(self) -> str:
        return f"RunLogSink({str(self.path)!r})"

    def _open(self, header: Header) -> IO[str]:
        """The new file, its header written."""
        if self._dir is None:
            f = open(self.path, "w", encoding="utf-8")  # an explicit path: a new run replaces it
        else:
            stem, n = self.path.stem, 1
            while True:
                try:
                    f = open(self.path, "x", encoding="utf-8")
                    break
                except FileExistsError:
                    n += 1
                    self.path = self._dir / f"{stem}-{n}.jsonl"
        f.write(header_line(header))
        f.flush()
        return f
