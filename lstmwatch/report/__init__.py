"""What people look at: one matplotlib figure of a run (figure.py) and a self-contained HTML report (html.py).

Both read a Run (lstmwatch.run): give them a Run, a run log path, or anything with an `as_run()` method
(a Watcher). Nothing here imports matplotlib; figure.py does, when a figure is drawn.
"""

from __future__ import annotations

import os
from typing import Any

from ..run import Run
from .source import as_run

RunView = Run  # the report's former name for the run it reads

__all__ = ["Run", "RunView", "as_run", "plot", "render_html", "write_html"]


def plot(run: Any) -> Any:
    """One matplotlib Figure of a run (needs the [plots] extra)."""
    from .figure import plot as _plot

    return _plot(run)


def render_html(run: Any, **kwargs: Any) -> str:
    """The report of a run as one self-contained HTML string."""
    from .html import render

    return render(run, **kwargs)


def write_html(run: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """Write the report of a run to `path`; returns the path."""
    from .html import write

    return write(run, path, **kwargs)
