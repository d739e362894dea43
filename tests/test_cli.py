"""The `lstmwatch` command: exit codes, one-line errors, report, summary and the demo."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.cli import main
from lstmwatch.demo import Progress, scenarios, verdict
from lstmwatch.events import Event

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmwatch", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """A run log of a few steps of a tiny LSTM."""
    path = tmp_path_factory.mktemp("log") / "tiny.jsonl"
    torch.manual_seed(0)
    lstm, head = nn.LSTM(2, 4, batch_first=True), nn.Linear(4, 1)
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with lstmwatch.watch(model, log_every=1, console=False, log_path=path) as w:
        for _ in range(4):
            x = torch.randn(3, 5, 2)
            loss = head(lstm(x)[0][:, -1]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    return path


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lstmwatch: ")
    return lines[0]


# --- in a subprocess, as people run it

def test_version():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lstmwatch {lstmwatch.__version__}"


def test_errors_in_a_subprocess_are_one_line_and_exit_2(tmp_path):
    r = cli("report", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "no such file" in one_line_error(r.stderr)
    r = cli("report", "run.jsonl", "--bogus")
    assert r.returncode == 2 and "--bogus" in one_line_error(r.stderr)


def test_report_and_summary_in_a_subprocess(log, tmp_path):
    out = tmp_path / "r.html"
    r = cli("report", str(log), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and out.read_text().startswith("<!DOCTYPE html>")
    r = cli("summary", str(log))
    assert r.returncode == 0 and r.stdout.startswith("lstmwatch: 4 steps watched on lstm")


def test_report_without_matplotlib_still_writes_the_report(log, tmp_path):
    out = tmp_path / "bare.html"
    code = ("import sys; sys.modules['matplotlib'] = None; from lstmwatch.cli import main; "
            f"sys.exit(main(['report', {str(log)!r}, '-o', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "matplotlib is not installed" in one_line_error(r.stderr)
    text = out.read_text()
    assert "<img" not in text and "Plots left out" in text


# --- in process: the same main(), faster

@pytest.mark.parametrize("args, message", [
    ([], "choose a command"),
    (["frobnicate"], "invalid choice"),
    (["report"], "required"),
    (["summary", "a", "b"], "unrecognized arguments"),
    (["demo", "--quick=3"], "ignored explicit argument"),
])
def test_bad_arguments(capsys, args, message):
    assert main(args) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_bad_files(capsys, tmp_path, log):
    (tmp_path / "garbage.jsonl").write_text("this is not json\n")
    (tmp_path / "other.jsonl").write_text('{"type": "record", "step": 1, "stats": {}}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    cases = [
        (["summary", str(tmp_path / "nope.jsonl")], "no such file"),
        (["summary", str(tmp_path / "garbage.jsonl")], "line 1"),
        (["report", str(tmp_path / "other.jsonl")], "header"),
        (["summary", str(tmp_path / "empty")], "no run log"),
        (["report", str(log), "-o", str(tmp_path / "a_file" / "r.html")], "cannot write"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in one_line_error(capsys.readouterr().err), args


def test_report_default_output_and_folders(capsys, log, tmp_path):
    assert main(["report", str(log)]) == 0
    assert log.with_suffix(".html").exists()
    assert main(["report", str(log.parent), "-o", str(tmp_path)]) == 0  # a folder: its newest log; into a folder
    assert (tmp_path / "tiny.html").exists()
    assert main(["summary", str(log)]) == 0
    assert "steps watched" in capsys.readouterr().out


# --- the demo's pieces

@pytest.mark.parametrize("expected, kinds, status", [
    ((), [], "OK"),
    ((), ["gate_saturation"], "ALARM"),
    (("diverging_loss",), ["diverging_loss"], "FOUND"),
    (("diverging_loss", "exploding_gradient"), ["nonfinite", "exploding_gradient"], "FOUND"),
    (("stalled_loss",), [], "MISSED"),
    (("padding",), ["stalled_loss"], "MISSED"),
])
def test_verdict(expected, kinds, status):
    events = [Event(4 + i, k, "warning", "lstm", "measured", "fix") for i, k in enumerate(kinds)]
    got, line, _ = verdict("run", expected, events)
    assert got == status
    assert line.startswith("run: ")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_redraws_on_a_terminal_and_writes_one_line_otherwise():
    for tty in (True, False):
        s = _Stream(tty)
        bar = Progress("[1/1] run", 50, s)
        for step in range(1, 51):
            bar.update(step, 50)
        bar.finish(50)
        text = s.getvalue()
        assert text.count("\n") == 1 and text.endswith("s\n")
        assert ("\r" in text) == tty
        assert ("50/50" in text) == tty


@pytest.mark.slow
def test_demo_quick_writes_loadable_logs_and_reports(tmp_path):
    r = cli("demo", "--quick", "--out", "out", cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("OK     healthy_forecast: no problem found") for line in lines), r.stdout
    out = tmp_path / "out"
    names = [sc.name for sc in scenarios.DEMO]
    for name in names:
        run = lstmwatch.load(out / f"{name}.jsonl")
        assert run.records and run.complete
        assert (out / f"{name}.html").read_text().startswith("<!DOCTYPE html>")
        assert any(line.split()[1].rstrip(":") == name for line in lines if line[:6].strip() in
                   ("OK", "FOUND", "MISSED", "ALARM"))
    assert (out / "index.html").exists()
    assert str(out.relative_to(tmp_path)) in r.stdout


def test_report_on_a_large_log_says_what_it_is_doing(capsys, log, tmp_path, monkeypatch):
    import lstmwatch.cli as cli

    monkeypatch.setattr(cli, "PROGRESS_BYTES", 1)  # every log counts as large
    assert main(["report", str(log), "-o", str(tmp_path / "r.html"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "lstmwatch: reading tiny.jsonl" in err and "records" in err and "drawing the report" in err
    monkeypatch.setattr(cli, "PROGRESS_BYTES", 2**40)
    assert main(["report", str(log), "-o", str(tmp_path / "r.html"), "--no-plots"]) == 0
    assert "reading" not in capsys.readouterr().err  # a small log: nothing but the result
