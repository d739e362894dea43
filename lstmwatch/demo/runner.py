"""`lstmwatch demo`'s run: train the demo scenarios, print a verdict for each, and write every run's log
and report, and an index page, to a folder."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import IO

from ..diagnose import Finding, diagnose
from ..errors import UsageError
from ..events import Event


class Progress:
    """A progress bar: redrawn in place with \\r on a terminal, a single line otherwise."""

    def __init__(self, label: str, total: int, stream: IO[str], width: int = 28):
        self.label, self.total, self.stream, self.width = label, max(1, total), stream, width
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last = -1.0
        if not self.tty:
            stream.write(f"{label} ... ")
            stream.flush()

    def update(self, step: int, total: int) -> None:
        """The progress callback of scenarios.run: redraw at most 20 times a second."""
        self.total = max(1, total)
        now = time.perf_counter()
        if self.tty and (now - self._last > 0.05 or step >= total):
            self._last = now
            self._draw(step)

    def _draw(self, step: int, tail: str = "") -> None:
        done = int(self.width * min(step, self.total) / self.total)
        bar = "#" * done + "-" * (self.width - done)
        self.stream.write(f"\r{self.label} [{bar}] {step:>4}/{self.total}{tail}")
        self.stream.flush()

    def finish(self, steps: int) -> float:
        """End the line; returns the seconds the run took."""
        dt = time.perf_counter() - self.t0
        if self.tty:
            self._draw(steps, f"  {dt:.1f} s\n")
        else:
            self.stream.write(f"{steps} steps, {dt:.1f} s\n")
            self.stream.flush()
        return dt


@dataclass
class Outcome:
    """What the demo found in one run, against what the scenario planted."""

    name: str
    status: str  # OK, FOUND, MISSED or ALARM
    line: str
    findings: list[Finding]
    log: str
    report: str
    seconds: float

    @property
    def as_expected(self) -> bool:
        """Whether the run went as its scenario planned: a healthy run silent, a fault found."""
        return self.status in ("OK", "FOUND")


def verdict(name: str, expected: tuple[str, ...], events: list[Event]) -> tuple[str, str, list[Finding]]:
    """(status, one line for people, findings) of a run whose planted fault is `expected` (empty: healthy)."""
    findings = diagnose(events)
    top = findings[0].cause if findings else None

    def said(e: Event) -> str:
        return f"{e.kind}{' in ' + e.module if e.module else ''} at step {e.step}"

    if not expected:
        if top is None:
            return "OK", f"{name}: no problem found", findings
        return "ALARM", f"{name}: {said(top)} (unexpected: a healthy run should raise nothing)", findings
    hits = sorted((e for e in events if e.kind in expected), key=lambda e: e.step)
    if not hits:
        found = f"found {said(top)} instead" if top else "found nothing"
        return "MISSED", f"{name}: expected {' or '.join(expected)}; {found}", findings
    if top is None or top.kind in expected:  # None: the expected events were not ranked (info only)
        return "FOUND", f"{name}: {said(top or hits[0])} (expected)", findings
    return "FOUND", f"{name}: {said(top)}, and {said(hits[0])} (expected)", findings


def _details(findings: list[Finding], report: str, width: int = 100) -> list[str]:
    """The top finding's measurement and fix, wrapped and indented under the verdict line."""
    if not findings:
        return []
    pad = " " * 7
    e = findings[0].cause
    lines = textwrap.wrap(e.message, width, initial_indent=pad, subsequent_indent=pad)
    lines += textwrap.wrap("fix: " + e.hint, width, initial_indent=pad, subsequent_indent=pad + "     ")
    if len(findings) > 1:
        rest = ", ".join(f.kind for f in findings[1:])
        lines.append(f"{pad}+{len(findings) - 1} more root cause(s): {rest}; see {report}")
    return lines


def run_demo(out: str = "lstmwatch-demo", quick: bool = False, plots: bool = True,
             stream: IO[str] | None = None) -> int:
    """Train the demo runs, print a verdict for each, and write their logs and reports under `out`."""
    import torch

    stream = stream or sys.stdout
    # These LSTMs are tiny: a second thread buys nothing and, on a busy machine, costs 10x in waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(out, quick, plots, stream)
    finally:
        torch.set_num_threads(threads)


def _demo(out: str, quick: bool, plots: bool, stream: IO[str]) -> int:
    from ..report.html import plots_missing, write
    from ..runlog import load
    from . import scenarios

    t_start = time.perf_counter()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror or exc}") from None
    runs = scenarios.DEMO
    why = plots_missing() if plots else None
    p = stream.write
    p(f"lstmwatch demo: {len(runs)} small LSTMs trained on CPU{' (quick: a third of the steps)' if quick else ''}, "
      "one healthy and one for each failure named by 'Why is my custom PyTorch LSTM architecture not "
      "learning?', each watched by lstmwatch.\n")
    if why:
        p(f"plots: left out of the reports, {why}\n")
    p("\n")
    stream.flush()
    outcomes: list[Outcome] = []
    width = max(len(sc.name) for sc in runs)
    for i, sc in enumerate(runs, 1):
        steps = max(10, sc.steps // 3) if quick else sc.steps
        log = os.path.join(out, f"{sc.name}.jsonl")
        bar = Progress(f"[{i}/{len(runs)}] {sc.name:<{width}}", steps, stream)
        watcher = scenarios.run(sc, steps=steps, progress=bar.update, console=False, log_path=log)
        seconds = bar.finish(watcher.step_count)
        run = load(log)  # the report is made from the log, as `lstmwatch report` would
        report = write(run, os.path.join(out, f"{sc.name}.html"), plots=plots,
                       title=f"{sc.name}: {sc.title}")
        status, line, findings = verdict(sc.name, sc.expected, run.events)
        outcomes.append(Outcome(sc.name, status, line, findings, log, report, seconds))
    p("\nWhat lstmwatch found:\n")
    for o in outcomes:
        p(f"{o.status:<6} {o.line}\n")
        for line in _details(o.findings, o.report):
            p(line + "\n")
    index = _index(out, outcomes, quick)
    good = sum(o.as_expected for o in outcomes)
    p(f"\n{good} of {len(outcomes)} runs as expected, in {time.perf_counter() - t_start:.0f} s.\n")
    p(f"Run logs and reports are in {os.path.join(out, '')}: open {index}\n"
      f"From a log again: lstmwatch summary {outcomes[-1].log}; lstmwatch report {outcomes[-1].log}\n")
    stream.flush()
    return 0


_BADGE = {"OK": "ok", "FOUND": "info"}


def _index(out: str, outcomes: list[Outcome], quick: bool) -> str:
    """index.html: one line per demo run, linking its report and log."""
    from html import escape

    from ..report.html import page

    rows = "".join(
        f"<tr><td><span class=\"badge {_BADGE.get(o.status, 'error')}\">{escape(o.status)}</span></td>"
        f"<td>{escape(o.line)}</td><td><a href=\"{escape(os.path.basename(o.report))}\">report</a></td>"
        f"<td><a href=\"{escape(os.path.basename(o.log))}\">log</a></td><td class=\"num\">{o.seconds:.1f} s</td></tr>"
        for o in outcomes)
    text = page("lstmwatch demo", f"<h1>lstmwatch demo</h1><p class=\"meta\">{len(outcomes)} small LSTMs trained on "
                f"CPU{' (quick)' if quick else ''}: one healthy, one for each failure the article names.</p><section>"
                "<table><thead><tr><th>verdict</th><th>what lstmwatch found</th><th></th><th></th><th>time</th></tr>"
                f"</thead><tbody>{rows}</tbody></table></section>")
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
