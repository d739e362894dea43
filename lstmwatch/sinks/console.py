"""The console: each warning or error event as a typed Python warning, nothing else on a healthy run."""

from __future__ import annotations

import sys
import warnings

from .._frames import user_frame
from ..events import Event, Record, warning_for


def user_stacklevel() -> int:
    """The stacklevel that points the caller's warnings.warn at the first frame outside lstmwatch."""
    return user_frame()[1]


class ConsoleSink:
    """Sends warning and error events through `warnings`, so filters and `-W error::...` apply."""

    def __init__(self) -> None:
        self.emitted: list[Event] = []

    def write(self, record: Record) -> None:
        """Records are not printed: a healthy run stays silent."""

    def emit(self, event: Event) -> None:
        """Raise the event's typed warning at the user's `watcher.step(...)` line."""
        if event.severity == "info":
            return
        self.emitted.append(event)
        warnings.warn(warning_for(event), stacklevel=user_stacklevel())

    def close(self) -> None:
        """One line at the end of a run in which something was found."""
        if self.emitted:
            kinds = sorted({e.kind for e in self.emitted})
            print(f"lstmwatch: {len(self.emitted)} warning(s) this run ({', '.join(kinds)}); "
                  "print(watcher.summary()) for the diagnosis", file=sys.stderr)
