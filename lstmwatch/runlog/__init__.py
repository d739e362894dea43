"""The run log: one JSON Lines file per run. `format` is the line layout (encoding and decoding), `reader`
loads a file or a folder's newest run back into a Run; the writer is the sink `lstmwatch.sinks.RunLogSink`.
"""

from ..run import Run
from .format import FORMAT, end_line, event_line, header_line, record_line
from .reader import load, newest, run_logs

__all__ = ["FORMAT", "Run", "load", "newest", "run_logs", "header_line", "record_line", "event_line", "end_line"]
