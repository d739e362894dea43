"""The console: each warning or error event as a typed Python warning, nothing else on a healthy run."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..events import Event, warning_for
from ..frames import warn_at_user
from ..interfaces import Header, Summary
from ..record import Record


class ConsoleSink:
    """Sends warning and error events through `warnings`, so filters and `warnings.filterwarnings` apply.

    What it sent is kept bounded, whatever the length of the run: a count per kind, and the first `keep` events.
    """

    def __init__(self, keep: int = 20) -> None:
        self.keep = keep
        self.counts: dict[str, int] = {}  # kind -> warnings and errors sent
        self.first: list[Event] = []  # the first `keep` of them

    def start(self, header: Header) -> None:
        """Nothing to print when a run starts: a healthy run stays silent."""

    def write(self, record: Record, events: Sequence[Event] = ()) -> None:
        """Raise each warning or error event's typed warning at the user's `watcher.step(...)` line."""
        for event in events:
            if event.severity == "info":
                continue
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            if len(self.first) < self.keep:
                self.first.append(event)
            warn_at_user(warning_for(event))

    def close(self, summary: Summary | None = None) -> None:
        """One line at the end of a run in which something was found."""
        if self.counts:
            print(f"lstmwatch: {sum(self.counts.values())} warning(s) this run ({', '.join(sorted(self.counts))}); "
                  "print(watcher.summary()) for the diagnosis", file=sys.stderr)
