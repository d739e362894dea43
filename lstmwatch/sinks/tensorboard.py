"""TensorBoard: the W&B sink's scalars under the same `lstmwatch/` keys, events and the run's header as text.

Any writer with `add_scalar`, `add_text` and `flush` will do: `torch.utils.tensorboard.SummaryWriter`,
tensorboardX's, or Lightning's `TensorBoardLogger.experiment`. TensorBoard itself is imported only when the
sink has to make its own SummaryWriter.

Curves (`record.curves`, one value per timestep) are not written: a TensorBoard histogram would bin the values
and lose the timestep axis, which is the whole point of a gradient-through-time curve. Their summaries
(`<module>/gtt/gain`, `<module>/gtt/ratio`) are statistics of the record, and come as scalars like the rest.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import keys
from ..events import Event, LSTMWatchWarning
from ..frames import user_stacklevel
from ..interfaces import Header, Summary
from ..record import Record
from .wandb import MAX_KEYS, PREFIX, key_filter

EVENTS = PREFIX + "events"
HEADER = PREFIX + "header"
SUMMARY = PREFIX + "summary"
COLUMNS = ["step", "kind", "severity", "module", "message", "hint"]
_WRITER_METHODS = ("add_scalar", "add_text", "flush")


def summary_writer(log_dir: str | os.PathLike | None = None) -> Any:
    """A new `torch.utils.tensorboard.SummaryWriter` (runs/<time>_<host> when log_dir is None), or an
    ImportError that says how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("lstmwatch.watch(..., tensorboard=...) needs the tensorboard package: "
                          "pip install 'lstmwatch[tensorboard]'") from exc
    return SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))


class TensorBoardSink:
    """Writes each record's statistics as scalars at its step, and events as markdown text, into a TensorBoard
    log; a writer given is flushed, never closed (it is the user's), one made here is closed with the run."""

    def __init__(self, writer: Any = None, *, keys: str | Sequence[str] | None = None, max_keys: int = MAX_KEYS):
        try:
            self._want = key_filter(keys)
        except TypeError:  # key_filter speaks of wandb_keys; the same rules, under this option's name
            raise TypeError("tensorboard_keys must be None, 'all' or glob patterns of statistic names, "
                            f"got {keys!r}") from None
        if writer is None or writer is True or isinstance(writer, (str, os.PathLike)):
            if writer is not None and writer is not True and Path(writer).is_file():
                # Fail at watch() time with the option's name, not with SummaryWriter's FileExistsError.
                raise ValueError(f"tensorboard={os.fspath(writer)!r} is a file: give a folder for the TensorBoard "
                                 "log")
            folder = None if writer is None or writer is True else writer
            self.writer = summary_writer(folder)
            self.owned = True
        elif all(callable(getattr(writer, m, None)) for m in _WRITER_METHODS):
            self.writer = writer
            self.owned = False
        else:
            raise TypeError("tensorboard= takes True, a log folder, or a SummaryWriter (an object with add_scalar, "
                            f"add_text and flush), got {type(writer).__name__}")
        # Not named `path`: the watcher takes a sink's `path` for its run log.
        log_dir = getattr(self.writer, "log_dir", None)
        self.log_dir: str | None = log_dir if isinstance(log_dir, str) else None
        self.max_keys = max_keys
        self._warned = False
        self._kinds: Counter[str] = Counter()
        self.closed = False

    def start(self, header: Header) -> None:
        """The run's configuration (versions, settings, each watched module) as text at step 0."""
        modules = ", ".join(f"`{m.name}` ({m.kind})" for m in header.modules) or "none"
        text = (f"lstmwatch {header.lstmwatch} · torch {header.torch} · python {header.python} · "
                f"log_every {header.log_every} · sample {header.sample} · modules: {modules}\n\n"
                f"```json\n{json.dumps(header.as_dict(), indent=2, default=str)}\n```")
        self.writer.add_text(HEADER, text, global_step=0)
        self.writer.flush()

    def write(self, record: Record, events: Sequence[Event] = ()) -> None:
        """The record's statistics as scalars at record.step, its events as one markdown table; then a flush,
        so TensorBoard shows the run as it trains."""
        if self.closed:
            return
        # Run-wide statistics first, so the loss and total norm survive the cap.
        names = [k for k in sorted(record.stats, key=lambda k: keys.parse(k).kind != "run") if self._want(k)]
        if len(names) > self.max_keys:
            if not self._warned:
                self._warned = True
                warnings.warn(f"lstmwatch: {len(names)} statistics per step, TensorBoard gets the first "
                              f"{self.max_keys}; choose them with watch(..., tensorboard_keys=[glob patterns])",
                              LSTMWatchWarning, stacklevel=user_stacklevel())
            names = names[:self.max_keys]
        for k in names:
            self.writer.add_scalar(PREFIX + k, record.stats[k], global_step=record.step)
        if events:
            # One text per logging step, not per event: TensorBoard keeps a sample of each text tag's steps.
            self._kinds.update(e.kind for e in events)
            self.writer.add_text(EVENTS, events_markdown(events), global_step=record.step)
        self.writer.flush()

    def close(self, summary: Summary | None = None) -> None:
        """A line on how the run ended; then close the writer made here, or flush the user's."""
        if self.closed:
            return
        self.closed = True
        try:
            if summary is not None:
                kinds = ", ".join(f"{k} ×{n}" for k, n in self._kinds.most_common()) or "none"
                self.writer.add_text(SUMMARY, f"{summary.steps} steps, {summary.records} records, "
                                              f"{summary.events} events ({kinds})", global_step=summary.steps)
        finally:
            if self.owned:
                self.writer.close()
            else:
                self.writer.flush()


def events_markdown(events: Sequence[Event]) -> str:
    """Events as a markdown table: step, kind, severity, module, message, hint."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for e in events:
        cells = [str(e.step), e.kind, e.severity, f"`{e.module}`" if e.module else "", e.message, e.hint]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    # A '|' would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
