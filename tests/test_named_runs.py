"""watch(model, name=...): the name in the run log's file name and header, the report's title, the CLI's summary
and the W&B run; without one, the log is named by time and process id as before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lstmwatch


def _train(w, lstm, steps: int = 3) -> None:
    for _ in range(steps):
        out, _ = lstm(torch.randn(4, 5, 3))
        out.pow(2).mean().backward()
        w.step(1.0)


def test_the_name_reaches_the_log_the_report_and_the_cli(tmp_path):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with lstmwatch.watch(lstm, name="baseline lr=3e-3", log_dir=tmp_path, console=False) as w:
        _train(w, lstm)
    (log,) = tmp_path.glob("*.jsonl")
    assert log.name.startswith("baseline_lr=3e-3-") and w.log_path == str(log)
    run = lstmwatch.load(log)
    assert run.header["name"] == "baseline lr=3e-3" and run.name == "baseline lr=3e-3"
    html = tmp_path / "r.html"
    done = subprocess.run([sys.executable, "-m", "lstmwatch", "report", str(log), "-o", str(html), "--no-plots"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "<title>" in html.read_text() and "baseline lr=3e-3" in html.read_text().split("</title>")[0]
    done = subprocess.run([sys.executable, "-m", "lstmwatch", "summary", str(log)], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.splitlines()[0] == "run baseline lr=3e-3"


def test_without_a_name_the_log_is_named_by_time_and_pid(tmp_path):
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with lstmwatch.watch(lstm, log_dir=tmp_path, console=False) as w:
        _train(w, lstm, 1)
    (log,) = tmp_path.glob("*.jsonl")
    assert log.stem.endswith(f"-{os.getpid()}") and lstmwatch.load(log).header.get("name") == ""


@pytest.mark.parametrize("bad", ["", "  ", 3])
def test_a_name_that_is_not_one_is_refused(bad):
    with pytest.raises(TypeError, match="name"):
        lstmwatch.watch(torch.nn.LSTM(3, 8), name=bad)


def test_the_name_is_in_the_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from test_wandb import Offline

    monkeypatch.chdir(tmp_path)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="lstmwatch-test")
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with lstmwatch.watch(lstm, name="baseline", wandb=run, console=False) as w:
        _train(w, lstm, 2)
    run.finish()
    assert Offline(tmp_path).summary["lstmwatch/name"] == "baseline"
