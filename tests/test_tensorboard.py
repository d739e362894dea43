"""The TensorBoard sink against real TensorBoard event files, proved by reading them back with TensorBoard's reader."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.events import Event, LSTMWatchWarning, Record
from lstmwatch.interfaces import Header, ModuleInfo, Sink, Summary
from lstmwatch.sinks import TensorBoardSink, make_sinks

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util.tensor_util import make_ndarray  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

pytestmark = pytest.mark.timeout(60)


# --- reading a log back
class Log:
    """What TensorBoard reads from a log folder: scalars {tag: {step: value}} and texts {tag: {step: str}}."""

    def __init__(self, folder: Path):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every step
        acc.Reload()
        self.scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
        self.texts: dict[str, dict[int, str]] = {}
        for t in acc.Tags()["tensors"]:
            tag = t.removesuffix("/text_summary")  # SummaryWriter.add_text's tag, as TensorBoard files it
            for e in acc.Tensors(t):
                assert e.step not in self.texts.setdefault(tag, {}), f"two texts of {tag} at step {e.step}"
                self.texts[tag][e.step] = make_ndarray(e.tensor_proto).item().decode()


def same32(written: float, read: float) -> bool:
    """TensorBoard keeps scalars as float32."""
    return np.float32(written) == np.float32(read) or (math.isnan(written) and math.isnan(read))


# --- a small real training run
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def train(steps: int = 6, scale: float = 100.0, **options) -> lstmwatch.Watcher:
    """Train on raw inputs (x * 100): an unnormalized_input event on the first records."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = lstmwatch.watch(model, log_every=2, console=False, **options)
    for _ in range(steps):
        loss = (model(torch.randn(4, 6, 3) * scale) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.step(loss)
    w.close()
    return w


def expected_tags(record: Record) -> set[str]:
    """The default selection, as in W&B: every statistic but the per-parameter gradient norms."""
    return {"lstmwatch/" + k for k in record.stats
            if not (k.endswith("/grad_norm") and k.split("/")[1].startswith(("weight_", "bias_")))}


def test_scalars_events_and_header_read_back(tmp_path):
    w = train(tensorboard=tmp_path)
    (sink,) = w.sinks
    assert isinstance(sink, TensorBoardSink) and isinstance(sink, Sink)
    assert sink.owned and sink.log_dir == str(tmp_path)
    assert sink.writer.all_writers is None  # made by lstmwatch, so closed by it
    assert w.log_path is None  # the sink's folder is not taken for a run log
    log = Log(tmp_path)

    # Every statistic of every record, at the record's step, under the W&B sink's keys.
    steps = [r.step for r in w.records]
    assert steps == [1, 2, 4, 6]
    assert set(log.scalars) == set().union(*map(expected_tags, w.records))
    for rec in w.records:
        for tag in expected_tags(rec):
            assert same32(rec.stats[tag[len("lstmwatch/"):]], log.scalars[tag][rec.step]), (tag, rec.step)
    assert {"lstmwatch/loss", "lstmwatch/grad_norm", "lstmwatch/lstm/l0/forget/sat_right",
            "lstmwatch/lstm/l1/forget/grad_norm", "lstmwatch/lstm/grad_norm", "lstmwatch/lstm/gtt/gain"} <= set(
        log.scalars)
    # Per-parameter norms and per-timestep curves stay out.
    assert not any("weight_" in t or "bias_" in t for t in log.scalars)
    assert w.records[-1].curves and not any(t[len("lstmwatch/"):] in w.records[-1].curves for t in log.scalars)

    # Events: one markdown table per logging step that raised any, at that step.
    assert any(e.kind == "unnormalized_input" for e in w.events)
    texts = log.texts["lstmwatch/events"]
    assert set(texts) == {e.step for e in w.events}
    for e in w.events:
        row = f"| {e.step} | {e.kind} | {e.severity} | `{e.module}` | "
        assert row in texts[e.step] and e.hint.replace("|", "\\|") in texts[e.step], (e, texts[e.step])
    assert texts[min(texts)].startswith("| step | kind | severity | module | message | hint |")

    # The header at step 0, the summary at the last step.
    header = log.texts["lstmwatch/header"][0]
    assert f"lstmwatch {lstmwatch.__version__}" in header and "`lstm` (lstm)" in header
    assert '"num_layers": 2' in header and "log_every 2" in header
    (end,) = log.texts["lstmwatch/summary"].items()
    assert end[0] == 6 and end[1].startswith(f"6 steps, 4 records, {len(w.events)} events (unnormalized_input ×")


class UserWriter(SummaryWriter):
    """The user's writer: counts lstmwatch's flush and close calls."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.flushes = self.closes = 0

    def flush(self):
        self.flushes += 1
        super().flush()

    def close(self):
        self.closes += 1
        super().close()


def test_a_users_writer_is_flushed_never_closed(tmp_path):
    writer = UserWriter(tmp_path)
    writer.add_scalar("train/lr", 0.05, 0)
    w = train(steps=4, scale=1.0, tensorboard=writer, tensorboard_keys=["loss", "*/forget/*"])
    sink = w.sinks[0]
    assert not sink.owned and sink.writer is writer
    assert writer.closes == 0 and writer.flushes >= len(w.records) + 1  # each logging step, and at close
    writer.add_scalar("train/lr", 0.05, 4)  # still the user's, still open
    writer.close()
    log = Log(tmp_path)
    assert set(log.scalars["train/lr"]) == {0, 4}
    ours = {t for t in log.scalars if t.startswith("lstmwatch/")}
    assert "lstmwatch/loss" in ours and "lstmwatch/lstm/l0/forget/sat_right" in ours
    assert all(t == "lstmwatch/loss" or "/forget/" in t for t in ours)
    assert [s for s in log.scalars["lstmwatch/loss"]] == [r.step for r in w.records]
    assert [log.scalars["lstmwatch/loss"][r.step] for r in w.records] == pytest.approx([r.loss for r in w.records])


def test_true_makes_a_writer_in_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (sink,) = make_sinks(console=False, tensorboard=True)
    assert sink.owned and Path(sink.log_dir).parent == Path("runs")
    sink.close(Summary(0))
    assert list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert make_sinks(console=False, tensorboard=False) == make_sinks(console=False, tensorboard=None) == []


class FakeWriter:
    """Any object with add_scalar, add_text and flush is a writer."""

    def __init__(self):
        self.scalars, self.texts, self.flushes = {}, {}, 0

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.setdefault(global_step, {})[tag] = value

    def add_text(self, tag, text, global_step=None):
        self.texts[tag, global_step] = text

    def flush(self):
        self.flushes += 1


def test_key_options_cap_and_markdown():
    stats = {"loss": math.nan, "grad_norm": math.inf, "m/l0/forget/mean": 0.5, "m/weight_ih_l0/grad_norm": 1.0,
             "m/l0/forget/grad_norm": 2.0}
    rec = Record(3, math.nan, stats, curves={"m/gtt": [1.0, 2.0]})
    default, every, some = FakeWriter(), FakeWriter(), FakeWriter()
    TensorBoardSink(default).write(rec)
    TensorBoardSink(every, keys="all").write(rec)
    TensorBoardSink(some, keys=["loss", "*/forget/*"]).write(rec)
    assert set(default.scalars[3]) == {"lstmwatch/loss", "lstmwatch/grad_norm", "lstmwatch/m/l0/forget/mean",
                                       "lstmwatch/m/l0/forget/grad_norm"}
    assert math.isnan(default.scalars[3]["lstmwatch/loss"]) and default.scalars[3]["lstmwatch/grad_norm"] == math.inf
    assert set(every.scalars[3]) == {"lstmwatch/" + k for k in stats}
    assert set(some.scalars[3]) == {"lstmwatch/loss", "lstmwatch/m/l0/forget/mean", "lstmwatch/m/l0/forget/grad_norm"}
    assert default.texts == {} and default.flushes == 1  # no event, no text

    capped = TensorBoardSink(FakeWriter(), max_keys=3)
    with pytest.warns(LSTMWatchWarning, match="first 3.*tensorboard_keys"):
        capped.write(rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped.write(rec)  # warned once only
    assert set(capped.writer.scalars[3]) == {"lstmwatch/loss", "lstmwatch/grad_norm", "lstmwatch/m/l0/forget/mean"}

    # A '|' or a newline in a message stays inside its cell; the header is text at step 0.
    sink = TensorBoardSink(FakeWriter())
    sink.start(Header((ModuleInfo("enc.lstm", "lstm", {"hidden_size": 8}),), 50, 8))
    sink.write(rec, [Event(3, "stalled_loss", "warning", "enc.lstm", "a | b\nc", "raise it"), Event(
        3, "padding", "info", "", "pads", "pack")])
    sink.close(Summary(3, 1, 2))
    texts = sink.writer.texts
    assert texts["lstmwatch/events", 3].splitlines()[2:] == [
        "| 3 | stalled_loss | warning | `enc.lstm` | a \\| b<br>c | raise it |",
        "| 3 | padding | info |  | pads | pack |"]
    assert "`enc.lstm` (lstm)" in texts["lstmwatch/header", 0] and '"hidden_size": 8' in texts["lstmwatch/header", 0]
    assert texts["lstmwatch/summary", 3] == "3 steps, 1 records, 2 events (stalled_loss ×1, padding ×1)"
    sink.write(rec)  # after close: nothing more
    assert set(sink.writer.scalars) == {3} and sink.writer.flushes == 3


def test_bad_arguments_fail_at_watch_time(tmp_path, monkeypatch):
    for bad in (42, object(), [str(tmp_path)]):
        with pytest.raises(TypeError, match="tensorboard="):
            lstmwatch.watch(nn.LSTM(3, 8), tensorboard=bad)
    with pytest.raises(TypeError, match="tensorboard_keys must be"):
        make_sinks(tensorboard=FakeWriter(), tensorboard_keys=5)
    with pytest.raises(TypeError, match="tensorboard_key"):
        make_sinks(tensorboard_key="all")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        lstmwatch.watch(nn.LSTM(3, 8), tensorboard=tmp_path / "file")
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    with pytest.raises(ImportError, match=r"lstmwatch\[tensorboard\]"):
        make_sinks(tensorboard=tmp_path)
    assert len(make_sinks(console=False, tensorboard=FakeWriter())) == 1  # a writer of the user's needs no import


def test_lightning_tensorboard_logger_experiment(tmp_path):
    loggers = pytest.importorskip("lightning.pytorch.loggers")
    logger = loggers.TensorBoardLogger(tmp_path, name="lt", version=0)
    w = train(steps=2, scale=1.0, tensorboard=logger.experiment)
    logger.finalize("success")
    log = Log(tmp_path / "lt" / "version_0")
    assert [s for s in log.scalars["lstmwatch/loss"]] == [r.step for r in w.records] == [1, 2]


def test_import_lstmwatch_does_not_import_tensorboard():
    code = ("import sys, lstmwatch, lstmwatch.sinks; lstmwatch.sinks.make_sinks(); "
            "assert not {'tensorboard', 'torch.utils.tensorboard'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
