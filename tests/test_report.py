"""The figure and the HTML report: panels for every kind of input, self-contained, escaped."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lstmwatch
import lstmwatch.report
from lstmwatch.events import Event
from lstmwatch.record import Record
from lstmwatch.report import as_run
from lstmwatch.report.figure import PANELS
from lstmwatch.report.html import page, render, write
from lstmwatch.run import Run
from lstmwatch.runlog.format import event_line

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ODD = "<script>alert('$x$ & \"y\"')</script>"  # html, a quote, mathtext dollars and a '/' in one module name


class Tiny(nn.Module):
    """A 2-layer LSTM under any attribute name, and a linear head."""

    def __init__(self, name: str = "lstm"):
        super().__init__()
        self.name = name
        self.add_module(name, nn.LSTM(3, 8, num_layers=2, batch_first=True))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = getattr(self, self.name)(x)
        return self.head(out[:, -1])


def train(tmp: Path, name: str = "lstm", steps: int = 6):
    model = Tiny(name)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    w = lstmwatch.watch(model, log_every=1, console=False, log_path=tmp / "run.jsonl")
    with w:
        for _ in range(steps):
            x = torch.randn(4, 6, 3)
            loss = (model(x) - x[:, :1, 0]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    return w


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    return train(tmp)


def panels(fig) -> set[str]:
    return {ax.get_label() for ax in fig.axes}


def test_plot_of_a_watcher_a_run_and_a_path(watched):
    path = watched.log_path
    for what in (watched, lstmwatch.load(path), str(path), Path(path)):
        fig = lstmwatch.plot(what)
        try:
            assert isinstance(fig, Figure)
            assert set(PANELS) <= panels(fig)
            # every panel drew something: a line beyond the healthy bands and event markers
            for ax in fig.axes:
                if ax.get_label() in PANELS:
                    assert ax.lines, ax.get_label()
        finally:
            plt.close(fig)


def test_plot_marks_events_nonfinite_values_and_survives_an_empty_run():
    recs = [Record(step=s, loss=v, stats={"loss": v, "m/grad_norm": g, "m/l0/grad_norm": g, "grad_norm": g,
                                          "m/l0/forget/sat_left": 0.1, "m/l0/forget/sat_right": 0.2,
                                          "m/data/absmax": 3.0, "m/data/std": 1.0, "m/data/pad_frac": 0.0},
                   curves={"m/gtt": [0.0, 1e-3, 1e-2, g]}, modules=("m",))
            for s, v, g in [(1, 1.0, 0.5), (2, 0.8, 0.0), (4, math.inf, math.nan), (8, math.nan, math.inf)]]
    events = [Event(2, "exploding_gradient", "warning", "m", "measured", "fix"),
              Event(4, "nonfinite", "error", "", "measured", "fix")]
    fig = lstmwatch.plot(Run({"modules": [{"name": "m"}]}, recs, events))
    try:
        loss = next(ax for ax in fig.axes if ax.get_label() == "loss")
        text = " ".join(t.get_text() for t in loss.texts)
        assert "exploding_gradient" in text and "nonfinite" in text
    finally:
        plt.close(fig)
    fig = lstmwatch.plot(Run({}, [], []))
    try:
        assert set(PANELS) <= panels(fig)
    finally:
        plt.close(fig)


def test_as_run_refuses_what_it_cannot_read():
    with pytest.raises(TypeError, match="Watcher"):
        as_run(42)

    class Probe:  # what the report once read: it reads only as_run() now
        probes, records, events, sinks = [], [], [], []

    with pytest.raises(TypeError, match="Watcher"):
        as_run(Probe())


def test_plot_twice(watched):
    # The function lstmwatch.report.plot must stay the function after a figure was drawn (it was once
    # replaced by its submodule of the same name: 'module' object is not callable).
    import lstmwatch.report as R

    run = lstmwatch.load(watched.log_path)
    figs = [R.plot(run), R.plot(run), lstmwatch.plot(run), lstmwatch.plot(run), R.plot(run)]  # each looked up anew
    for fig in figs:
        assert isinstance(fig, Figure)
        plt.close(fig)
    assert callable(R.plot) and R.plot is lstmwatch.report.plot


def test_the_report_of_a_watcher_is_the_report_of_its_log(watched):
    run = as_run(watched)
    assert isinstance(run, Run) and run.source == str(watched.log_path) and run.complete
    assert render(watched, plots=False) == render(watched.log_path, plots=False)


def test_page_is_the_shared_style():
    text = page("a <title>", "<p>body</p>")
    assert text.startswith("<!DOCTYPE html>") and text.endswith("</main></body></html>\n")
    assert "<title>a &lt;title&gt;</title>" in text and "<p>body</p>" in text and ".verdict" in text


def test_report_is_self_contained_and_in_order(watched, tmp_path):
    out = write(watched.log_path, tmp_path / "sub" / "report.html")
    text = Path(out).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I) is None
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', text)
    order = [text.index(s) for s in ('id="diagnosis"', 'id="plots"', 'id="events"', 'id="model"')]
    assert order == sorted(order)
    assert "hidden size" in text and "<code>lstm</code>" in text


def test_report_escapes_everything_from_the_model_and_the_run(tmp_path):
    torch.manual_seed(0)
    w = train(tmp_path, name=ODD, steps=3)
    log = Path(w.log_path)
    lines = log.read_text().splitlines(keepends=True)
    for e in (Event(2, "exploding_gradient", "error", ODD, "norm <b>9</b> & more", "use `clip_grad_norm_(m, 1.0)`"),
              Event(3, "<img src=x onerror=alert(1)>", "warning", "", "<i>", "<u>")):
        w.events.append(e)
        lines.insert(-1, event_line(e))  # before the closing line
    log.write_text("".join(lines))
    for what in (w, log):
        text = render(what)
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>9</b>" not in text
        assert "&lt;script&gt;alert(" in text and "&lt;b&gt;9&lt;/b&gt;" in text
        assert "<code>clip_grad_norm_(m, 1.0)</code>" in text  # backticks become code, after escaping
        assert "data:image/png;base64," in text  # the odd name did not break the figure (mathtext '$')


def test_report_without_matplotlib_says_so(watched, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    text = render(watched)
    assert "<img" not in text
    assert "Plots left out" in text and "lstmwatch[plots]" in text
    assert 'id="diagnosis"' in text and 'id="events"' in text


def test_report_of_a_healthy_run_and_of_a_run_cut_short(tmp_path):
    log = tmp_path / "cut.jsonl"
    torch.manual_seed(0)
    train(tmp_path, steps=2)
    full = (tmp_path / "run.jsonl").read_text().splitlines(keepends=True)
    log.write_text("".join(line for line in full if '"type":"end"' not in line))
    text = render(log, plots=False)
    assert "No problem found" in text or "root cause" in text
    assert "cut short" in text
    assert "Plots left out" in text


def _synthetic(n: int, dead: float = 0.0) -> Run:
    """Two modules over n records: enc learns, dec's gradient and update are `dead` (0: none at all), and enc's
    input and forget gates are both pinned at 1.0."""
    recs = []
    for s in range(1, n + 1):
        st = {"loss": 2.0 / s, "grad_norm": 1.0, "enc/l0/grad_norm": 0.5, "dec/l0/grad_norm": dead,
              "enc/l0/update_ratio": 1e-3, "dec/l0/update_ratio": dead,
              "enc/l0/forget/sat_left": 0.0, "enc/l0/forget/sat_right": 1.0,
              "enc/l0/input/sat_left": 0.0, "enc/l0/input/sat_right": 1.0, "enc/l0/h/sat": 0.3,
              "enc/data/absmax": 3.0, "enc/data/std": 1.0}
        recs.append(Record(step=s, loss=st["loss"], stats=st, modules=("enc", "dec")))
    return Run({"modules": [{"name": "enc"}, {"name": "dec"}]}, recs,
               [Event(2, "no_gradient", "error", "dec", "no gradient reaches dec", "fix")])


def _axes(fig, name):
    return next(ax for ax in fig.axes if ax.get_label() == name)


def test_plot_is_not_registered_with_pyplot(watched):
    # A pyplot figure returned as a notebook cell's last line is shown twice: by the inline backend, then by its repr.
    plt.close("all")
    fig = lstmwatch.plot(watched)
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == []
    assert fig._repr_png_().startswith(b"\x89PNG")  # shown once even where pyplot was never imported


def test_a_gradient_of_exactly_zero_is_drawn_on_a_floor():
    fig = lstmwatch.plot(_synthetic(20))
    grad = _axes(fig, "grad_norm")
    labels = [ln.get_label() for ln in grad.lines]
    dead = [ln for ln in grad.lines if "dec" in ln.get_label() and "no gradient" in ln.get_label()]
    assert dead, labels
    ys = [y for y in dead[0].get_ydata() if not math.isnan(y)]
    assert len(ys) == 20 and min(ys) > 0 and max(ys) < 0.5  # every step, below the living layer
    lo, hi = grad.get_ylim()
    assert lo < ys[0] < hi
    assert any(ln.get_label() == "0 (no gradient)" for ln in grad.lines)  # the floor line, in the legend
    assert any("dec" in ln.get_label() and "no update" in ln.get_label() for ln in _axes(fig, "update_ratio").lines)
    # A gradient that is tiny but not zero is drawn as itself, with no floor.
    fig = lstmwatch.plot(_synthetic(20, dead=1e-9))
    assert not any("no gradient" in ln.get_label() for ln in _axes(fig, "grad_norm").lines)


def test_long_runs_are_drawn_without_markers():
    fig = lstmwatch.plot(_synthetic(3000))
    marked = [(ax.get_label(), ln.get_label()) for ax in fig.axes for ln in ax.lines
              if len(ln.get_xdata()) > 200 and ln.get_marker() not in ("None", "", None, " ")]
    assert marked == []
    fig = lstmwatch.plot(_synthetic(20))  # a short run keeps its markers
    assert any(ln.get_marker() == "o" for ln in _axes(fig, "loss").lines)


def test_gates_pinned_together_stay_visible_and_legends_find_room():
    fig = lstmwatch.plot(_synthetic(20))
    sat = _axes(fig, "saturation")
    at_one = [ln for ln in sat.lines if list(ln.get_ydata()) == [1.0] * 20]
    assert len(at_one) == 2
    forget = next(ln for ln in at_one if ln.get_color() == "#ff7f0e")
    other = next(ln for ln in at_one if ln is not forget)
    # The forget gate lies wider and underneath: it shows around the input gate drawn over it.
    assert forget.get_linewidth() > other.get_linewidth() and forget.get_zorder() < other.get_zorder()
    assert sat.get_ylim()[1] > 1.02  # lines at 1.0 do not run along the frame
    for ax in fig.axes:
        if ax.get_legend() is not None:
            assert ax.get_legend()._loc in (0,), ax.get_label()  # "best": steered clear of the data


def test_module_names_do_not_wrap_in_the_tables(watched):
    text = render(watched, plots=False)
    assert re.search(r"td\.module\s*\{[^}]*white-space:\s*nowrap", text)
    assert re.search(r"td\.module code\s*\{[^}]*overflow-wrap:\s*normal", text)
    assert '<td class="module"><code>lstm</code></td>' in text  # the model table
    run = _synthetic(3)
    assert '<td class="module"><code>dec</code></td>' in render(run, plots=False)  # the events table
