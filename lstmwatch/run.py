"""Run: one watched run, whether read back from its log (`lstmwatch.load`) or taken from a live Watcher
(`watcher.as_run()`). The report, the plot, the CLI and the demo read runs through this type only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diagnose import Finding, diagnose, summary
from .events import Event
from .interfaces import Header
from .record import Record

__all__ = ["Run"]

# Log file names that say nothing about the run: the folder holding the file names it instead.
_GENERIC_NAMES = ("run", "log", "events", "lstmwatch")
_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")


@dataclass
class Run:
    """A run: its header (versions, settings, the watched modules), its records and events, in order."""

    header: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # step() calls: from the log's closing line or the live watcher; None for a log cut short.
    steps: int | None = None
    # Nothing is missing: the log ends with its closing line, or the run is live. False: a log cut short
    # (a crash, or a run still writing), which covers only what was written.
    complete: bool = True
    path: Path | None = None  # the run log, when there is one

    @classmethod
    def live(cls, header: Header, records: Iterable[Record], events: Iterable[Event], steps: int,
             path: str | os.PathLike | None = None) -> Run:
        """The run a Watcher is watching (or watched): a snapshot of its records and events now."""
        return cls(header.as_dict(), list(records), list(events), steps=steps, complete=True,
                   path=Path(path) if path is not None else None)

    @property
    def source(self) -> str:
        """The run log's path as text, or '' for a live run without one."""
        return os.fspath(self.path) if self.path is not None else ""

    @property
    def name(self) -> str:
        """What the report calls the run: the header's name, else the log file's, else 'run'."""
        named = self.header.get("name")
        if named:
            return str(named)
        return stem(self.source) if self.source else "run"

    @property
    def configs(self) -> dict[str, dict[str, Any]]:
        """Each watched module's configuration (kind, sizes, ...) by qualified name, from the header;
        without a description in the header, the names seen in the records with empty configurations."""
        mods = self.header.get("modules")
        if isinstance(mods, dict):
            return {str(k): dict(v) if isinstance(v, dict) else {} for k, v in mods.items()}
        if isinstance(mods, (list, tuple)):
            out: dict[str, dict[str, Any]] = {}
            for m in mods:
                if isinstance(m, dict):
                    out[str(m.get("name", f"module{len(out)}"))] = {k: v for k, v in m.items() if k != "name"}
                else:
                    out[str(m)] = {}
            return out
        return {m: {} for r in self.records for m in r.modules}

    @property
    def modules(self) -> list[str]:
        """Qualified names of the watched modules."""
        return list(self.configs)

    @property
    def step_count(self) -> int:
        """Steps watched: `steps`, or for a log cut short the last step it logged."""
        if self.steps is not None:
            return self.steps
        return max([r.step for r in self.records] + [e.step for e in self.events] + [0])

    @property
    def latest(self) -> Record | None:
        """The last record, or None if none was made."""
        return self.records[-1] if self.records else None

    def diagnose(self) -> list[Finding]:
        """The run's events ranked by likely root cause, as Watcher.diagnose()."""
        return diagnose(self.events)

    def summary(self) -> str:
        """The diagnosis as text for people, as Watcher.summary()."""
        return summary(self.diagnose(), steps=self.step_count, modules=self.modules)

    def _repr_html_(self) -> str:
        """The diagnosis and the plots as HTML, for a notebook cell whose last line is the run."""
        # The one edge back from Run to the report (tests/test_architecture.py declares it): imported when a
        # notebook displays a run, so importing lstmwatch.run never imports the report (nor matplotlib). Plots
        # come as an inline PNG when matplotlib is installed, otherwise the fragment says how to get them.
        from .report.html import fragment

        return str(fragment(self))

    def __repr__(self) -> str:
        where = self.path.name if self.path is not None else self.name
        state = "complete" if self.complete else "cut short"
        return (f"Run({where}: {', '.join(self.modules)}; {len(self.records)} records, "
                f"{len(self.events)} events; {state})")


def stem(path: str) -> str:
    """A run's name from its log's path: the file name without its suffix, or the folder's for a generic name."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base in _GENERIC_NAMES:
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return parent or base
    return base
