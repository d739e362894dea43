"""The `lstmwatch` command: demo, report, summary. Mistakes get one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import UsageError
from .run import Run

__all__ = ["USAGE_ERROR", "UsageError", "find_log", "main", "parser", "read"]

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see lstmwatch --help)")


def _version() -> str:
    from .version import __version__

    return f"lstmwatch {__version__}"


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `lstmwatch` command."""
    p = _Parser(prog="lstmwatch", description="Tells you why your PyTorch LSTM is not learning, while it trains.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="train small LSTMs, healthy and broken, and show what lstmwatch finds",
                       description="Train on CPU a healthy LSTM and one LSTM for each failure named by the "
                                   "troubleshooting article 'Why is my custom PyTorch LSTM architecture not "
                                   "learning?' (unnormalized inputs, learning rates, zero padding, depth and long "
                                   "sequences), each watched by lstmwatch; print what it found and write each "
                                   "run's log and report.")
    d.add_argument("--out", default="lstmwatch-demo", metavar="DIR",
                   help="folder for the run logs and reports (default: ./lstmwatch-demo/)")
    d.add_argument("--quick", action="store_true", help="a third of the steps")
    d.add_argument("--no-plots", action="store_true", help="write reports without plots")

    r = sub.add_parser("report", help="write a run log's HTML report",
                       description="Write one self-contained HTML file: the diagnosis, the plots, the events and "
                                   "the model's LSTMs.")
    r.add_argument("run", metavar="RUN.jsonl", help="a run log written with lstmwatch.watch(model, log_dir=...), "
                                                     "or a folder of them (the newest is read)")
    r.add_argument("-o", "--output", metavar="FILE", help="where to write the report (default: RUN.html)")
    r.add_argument("--no-plots", action="store_true", help="leave the plots out (no matplotlib needed)")

    s = sub.add_parser("summary", help="print a run log's diagnosis as text",
                       description="Print the diagnosis of a run log: root causes, most likely first, with fixes.")
    s.add_argument("run", metavar="RUN.jsonl", help="a run log, or a folder of them (the newest is read)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lstmwatch` command; returns the exit code."""
    try:
        args = parser().parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: demo, report or summary (see lstmwatch --help)")
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"lstmwatch: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("lstmwatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lstmwatch summary RUN | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - a person gets one line, not a traceback
        if os.environ.get("LSTMWATCH_DEBUG"):
            raise
        print(f"lstmwatch: internal error: {type(exc).__name__}: {exc} "
              "(please report it; LSTMWATCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


# --- commands

def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, quick=args.quick, plots=not args.no_plots)


PROGRESS_BYTES = 5 * 2**20  # logs from this size on: `lstmwatch report` says what it is doing


def _report(args: argparse.Namespace) -> int:
    from .report.html import plots_missing, write

    path = find_log(args.run)
    # A large log (thousands of records, tens of MB) takes seconds to read and draw: say what is happening.
    big = os.path.isfile(path) and os.path.getsize(path) >= PROGRESS_BYTES
    if big:
        print(f"lstmwatch: reading {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.0f} MB)", file=sys.stderr,
              flush=True)
    run = read(path)
    if big:
        print(f"lstmwatch: {len(run.records)} records, {len(run.events)} events; drawing the report", file=sys.stderr,
              flush=True)
    out = args.output or _default_output(path)
    if os.path.isdir(out):
        out = os.path.join(out, _default_output(os.path.basename(path)))
    plots = not args.no_plots
    if plots and (why := plots_missing()):
        print(f"lstmwatch: plots left out: {why}", file=sys.stderr)
    try:
        write(run, out, plots=plots)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"lstmwatch: wrote {out}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    run = read(find_log(args.run))
    if run.header.get("name"):
        print(f"run {run.name}")
    print(run.summary())
    return 0


COMMANDS = {"demo": _demo, "report": _report, "summary": _summary}


# --- reading run logs

def find_log(path: str) -> str:
    """The run log a path names: the file itself, or a folder's newest (the rule lstmwatch.load follows)."""
    if os.path.isdir(path):
        from .runlog.reader import run_logs

        logs = run_logs(path)
        if not logs:
            raise UsageError(f"no run log (.jsonl) in the folder {path}")
        newest = logs[-1]
        if len(logs) > 1:
            print(f"lstmwatch: reading the newest of {len(logs)} run logs in {path}: {newest.name}", file=sys.stderr)
        return os.path.join(path, newest.name)
    return path


def read(path: str) -> Run:
    """lstmwatch.load(path), with every way a file can be wrong turned into one UsageError line."""
    from .runlog.reader import load

    try:
        return load(path)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a run log") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # malformed: load() names the file and the line
        msg = str(exc).splitlines()[0] if str(exc) else f"{path} is not an lstmwatch run log"
        raise UsageError(msg.removeprefix("lstmwatch ")) from None


def _default_output(path: str) -> str:
    root, ext = os.path.splitext(path)
    return (root if ext in (".jsonl", ".json", ".log") else path) + ".html"


if __name__ == "__main__":
    sys.exit(main())
