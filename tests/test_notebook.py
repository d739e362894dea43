"""What a notebook shows: a Run as the last line of a cell is its diagnosis and plots, as one HTML fragment."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.events import Event
from lstmwatch.report.html import FRAGMENT_CLASS, scoped_css
from lstmwatch.run import Run

ODD = "<b>enc$</b>"


def _run(module: str = "enc") -> Run:
    return Run({"modules": [{"name": module}]}, [], [
        Event(1, "no_gradient", "error", module, "no gradient reaches <the module>", "call `loss.backward()`")])


def test_repr_html_of_a_live_run_has_the_diagnosis_and_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, batch_first=True)
    with lstmwatch.watch(model, log_every=1, console=False, log_path=tmp_path / "run.jsonl") as w:
        for _ in range(3):
            out, _ = model(torch.randn(2, 5, 3))
            loss = out.pow(2).mean()
            loss.backward()
            w.step(loss)
    for run in (w.as_run(), lstmwatch.load(tmp_path / "run.jsonl")):
        text = run._repr_html_()
        assert text.startswith(f'<div class="{FRAGMENT_CLASS}">') and text.endswith("</div>")
        assert 'id="diagnosis"' in text and "Diagnosis" in text
        assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', text)
        assert "<script" not in text and "<html" not in text and "<body" not in text  # a fragment, not a page


def test_repr_html_shows_findings_escaped():
    text = _run(ODD)._repr_html_()
    assert "no_gradient" in text and "no gradient reaches &lt;the module&gt;" in text
    assert "<code>loss.backward()</code>" in text
    assert ODD not in text and "&lt;b&gt;enc$&lt;/b&gt;" in text


def test_repr_html_without_matplotlib_is_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    text = _run()._repr_html_()
    assert "<img" not in text
    assert "no_gradient" in text and "lstmwatch[plots]" in text


def test_fragment_style_stays_inside_the_fragment():
    root = f".{FRAGMENT_CLASS}"
    css = scoped_css(root)
    rules = re.findall(r"([^{}]+)\{[^{}]*\}", css)
    assert rules
    for selectors in rules:
        for sel in selectors.split(","):
            assert sel.strip().startswith(root), sel  # no rule reaches the notebook's own page
    assert "--ink" in css and "td.module" in css


def test_a_watcher_shows_its_run_so_far_in_a_notebook():
    import torch

    import lstmwatch

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with lstmwatch.watch(lstm, console=False, log_every=1) as w:
        for _ in range(3):
            out, _ = lstm(torch.randn(4, 6, 3) * 1000)
            out.pow(2).mean().backward()
            w.step(1.0)
        html = w._repr_html_()
    assert html.startswith("<div") and "unnormalized" in html.lower()
