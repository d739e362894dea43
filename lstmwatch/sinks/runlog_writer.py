"""The run log's writer: every record and event of a run, one JSON line each, in a file `lstmwatch.load`
reads back (the line layout is lstmwatch.runlog.format's).

A place that can never hold the log (log_dir= a file, log_path= a folder) is refused when the sink is made,
at the watch() call. Once the run goes, a write that fails (disk full, file removed) raises its OSError to
the watcher, which reports it and switches the sink off; the sink has already closed its file by then and
writes nothing more, so the log stays what it was, cut short at its last complete line.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..events import Event
from ..interfaces import Header, ModuleInfo, Summary
from ..record import Record
from ..runlog.format import end_line, event_line, header_line, record_line


class RunLogSink:
    """Writes `<log_dir>/<YYYYmmdd-HHMMSS>-<pid>.jsonl` (`<name>-<YYYYmmdd-HHMMSS>.jsonl` for a named run; or
    `path`), flushed on every logging step."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None):
        if log_dir is not None and path is None:
            self._dir: Path | None = Path(log_dir)
            folder, option = self._dir, f"log_dir={str(log_dir)!r}"
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{option} is a file, not a folder: give log_dir= a folder (one new file per "
                                 "run), or log_path= a file")
            # Final once the file is opened in start(): a name taken in the same second gets a suffix.
            self.path = self._dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        elif path is not None and log_dir is None:
            self._dir = None
            self.path = Path(path)
            folder, option = self.path.parent, f"log_path={str(path)!r}"
            if self.path.is_dir():
                raise ValueError(f"{option} is a folder, not a file: give log_path= a file, or log_dir= a folder "
                                 "(one new file per run)")
        else:
            raise ValueError("RunLogSink needs exactly one of log_dir= (a folder, one new file per run) or path=")
        # Fail at watch() time, not at the first logging step, on a folder that cannot be made or written.
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"{option}: the folder {folder} cannot be made, a part of its path is a file") from None
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"lstmwatch cannot write its run log into {folder}")
        self._file: IO[str] | None = None
        self._modules: tuple[str, ...] = ()
        self.closed = False

    def start(self, header: Header) -> None:
        """Create the file and write the header: versions, settings and each watched module's configuration."""
        self._modules = header.names
        try:
            self._file = self._open(header)
        except Exception:
            self._give_up()
            raise

    def write(self, record: Record, events: Sequence[Event] = ()) -> None:
        """The record's line, then one line per event, flushed: a crash loses at most the step being written.
        After a failure (its error raised to the caller) the file is closed and nothing more is written: a line
        after a half-written one would make the log unreadable past it."""
        if self.closed:
            return
        try:
            if self._file is None:  # used without start(): a header naming the record's modules
                self._modules = tuple(record.modules)
                self._file = self._open(Header.of([ModuleInfo(m) for m in record.modules]))
            self._file.write(record_line(record, self._modules))
            for event in events:
                self._file.write(event_line(event))
            self._file.flush()
        except Exception:
            self._give_up()
            raise

    def close(self, summary: Summary | None = None) -> None:
        """The closing line (how many steps were watched), then close the file; safe to call twice, and
        after a failed write, which closed the file already. Without a summary the log reads as cut short:
        nobody said how many steps the run had."""
        if self.closed:
            return
        self.closed = True
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if summary is not None:
                f.write(end_line(summary.steps))
        finally:
            f.close()  # the file is closed even when its last flush fails (and raises)

    def __repr__(self) -> str:
        return f"RunLogSink({str(self.path)!r})"

    def _open(self, header: Header) -> IO[str]:
        """The new file, its header written."""
        if self._dir is None:
            f = open(self.path, "w", encoding="utf-8")  # an explicit path: a new run replaces it
        else:
            if header.name:  # a named run: its name leads the file's, the time after it
                safe = re.sub(r"[^A-Za-z0-9._+=-]+", "_", header.name).strip("._") or "run"
                self.path = self._dir / f"{safe[:80]}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            stem, n = self.path.stem, 1
            while True:
                try:
                    f = open(self.path, "x", encoding="utf-8")
                    break
                except FileExistsError:
                    n += 1
                    self.path = self._dir / f"{stem}-{n}.jsonl"
        try:
            f.write(header_line(header))
            f.flush()
        except Exception:
            _close_quietly(f)
            raise
        return f

    def _give_up(self) -> None:
        """After a failure: the file closed, nothing more written, close() a no-op."""
        self.closed = True
        f, self._file = self._file, None
        if f is not None:
            _close_quietly(f)


def _close_quietly(f: IO[str]) -> None:
    """Close a file whose writing failed; flushing what it still holds may fail again, which is said already."""
    with contextlib.suppress(OSError, ValueError):
        f.close()
