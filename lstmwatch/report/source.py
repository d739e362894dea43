"""What a report is made from: a Run, a run log path, or anything that gives a Run with `as_run()`."""

from __future__ import annotations

import os
from typing import Any

from ..run import Run
from ..runlog.reader import load


def as_run(run: Any) -> Run:
    """The Run of a Run, a run log path (a file, or a folder's newest), or an object with `as_run()` (a Watcher)."""
    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load(run)
    method = getattr(run, "as_run", None)
    if callable(method):
        got = method()
        if isinstance(got, Run):
            return got
    raise TypeError(f"expected a Watcher, a Run from lstmwatch.load, or a run log path; got {type(run).__name__}")
