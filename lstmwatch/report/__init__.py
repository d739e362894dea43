"""What people look at: one matplotlib figure of a run (plot.py) and a self-contained HTML report (html.py).

Nothing here imports matplotlib; plot.py does, when called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..events import Event, Record

__all__ = ["RunView", "as_run", "plot", "render_html", "write_html"]


@dataclass
class RunView:
    """A run as the report reads it, whether it came from a Watcher, a loaded run log or a path."""

    header: dict[str, Any]
    records: list[Record]
    events: list[Event]
    name: str = "run"
    source: str = ""  # the run log's path, when there is one
    step_count: int | None = None  # steps watched, when the Watcher or the log's closing line says
    complete: bool = True  # False: a run log cut short (no closing line)

    @property
    def lstms(self) -> dict[str, dict[str, Any]]:
        """Module name -> its configuration, from the header (or the names seen in the records)."""
        mods = self.header.get("modules")
        if isinstance(mods, dict):
            return {str(k): dict(v) if isinstance(v, dict) else {} for k, v in mods.items()}
        if isinstance(mods, (list, tuple)):
            out: dict[str, dict[str, Any]] = {}
            for m in mods:
                if isinstance(m, dict):
                    rest = {k: v for k, v in m.items() if k != "name"}
                    out[str(m.get("name", f"module{len(out)}"))] = rest
                else:
                    out[str(m)] = {}
            return out
        names: dict[str, dict[str, Any]] = {}
        for r in self.records:
            for m in r.modules:
                names.setdefault(m, {})
        return names

    @property
    def modules(self) -> list[str]:
        """Qualified names of the watched modules."""
        return list(self.lstms)

    @property
    def steps(self) -> int:
        """How many steps the run watched (else the last step logged)."""
        if self.step_count is not None:
            return self.step_count
        return max([r.step for r in self.records] + [e.step for e in self.events] + [0])


def as_run(run: Any) -> RunView:
    """A RunView of a Watcher, a loaded run log (lstmwatch.load), a run log path, or a RunView."""
    if isinstance(run, RunView):
        return run
    if isinstance(run, (str, os.PathLike)):
        from ..runlog import load

        path = os.fspath(run)
        view = as_run(load(path))
        view.source = path
        if view.name == "run":
            view.name = _stem(path)
        return view
    if hasattr(run, "probes") and hasattr(run, "records"):  # a Watcher
        from .. import __version__

        header = {"lstmwatch": __version__,
                  "modules": [{"name": p.name, "kind": p.kind, **p.describe()} for p in run.probes]}
        view = RunView(header, list(run.records), list(run.events), step_count=run.step_count)
        for s in getattr(run, "sinks", ()):
            path = getattr(s, "path", None)
            if path:
                view.source = os.fspath(path)
                view.name = _stem(view.source)
        return view
    if hasattr(run, "records") and hasattr(run, "events"):  # lstmwatch.runlog.Run
        header = dict(getattr(run, "header", None) or {})
        source = os.fspath(getattr(run, "path", "") or "")
        name = header.get("name") or (_stem(source) if source else "run")
        steps = getattr(run, "step_count", None)
        return RunView(header, list(run.records), list(run.events), name=str(name), source=source,
                       step_count=steps if isinstance(steps, int) else None,
                       complete=bool(getattr(run, "complete", True)))
    raise TypeError(f"expected a Watcher, a Run from lstmwatch.load, or a run log path; got {type(run).__name__}")


def _stem(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in (".jsonl.gz", ".jsonl", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base in ("run", "log", "events", "lstmwatch"):  # a generic file name: the folder names the run
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return parent or base
    return base


def plot(run: Any) -> Any:
    """One matplotlib Figure of a run (needs the [plots] extra)."""
    from .plot import plot as _plot

    return _plot(run)


def render_html(run: Any, **kwargs: Any) -> str:
    """The report of a run as one self-contained HTML string."""
    from .html import render

    return render(run, **kwargs)


def write_html(run: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """Write the report of a run to `path`; returns the path."""
    from .html import write

    return write(run, path, **kwargs)
