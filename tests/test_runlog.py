"""The run log: a real watched run written with log_dir=, read back with lstmwatch.load."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.cli import find_log
from lstmwatch.events import Event
from lstmwatch.interfaces import Header, ModuleInfo, Summary
from lstmwatch.record import Record
from lstmwatch.run import Run
from lstmwatch.runlog import FORMAT, load, newest, run_logs
from lstmwatch.runlog.format import header_line
from lstmwatch.sinks import RunLogSink, make_sinks

pytestmark = pytest.mark.timeout(60)


class Net(nn.Module):
    """A 2-layer LSTM under a qualified name, then a bidirectional one."""

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleDict({"enc": nn.LSTM(3, 8, num_layers=2, batch_first=True)})
        self.dec = nn.LSTM(8, 4, bidirectional=True)  # (T, B, F)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h, _ = self.body["enc"](x)
        out, _ = self.dec(h.transpose(0, 1))
        return self.head(out[-1])


class EveryFourth:
    """A stand-in detector: a warning at steps 4 and 8, an info at 6."""

    kind = "every_fourth"  # a detector has a kind (watch() refuses one without)

    def update(self, record: Record) -> list[Event]:
        if record.step in (4, 8):
            return [Event(record.step, "stalled_loss", "warning", "body.enc", f"loss flat at {record.loss:.3g}",
                          "raise the learning rate")]
        if record.step == 6:
            return [Event(6, "gate_saturation", "info", "", "a note, with \"quotes\" and é", "none")]
        return []


def train(steps=10, nan_at=None, batches=None, close=True, **options):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lstmwatch.watch(model, log_every=2, console=False, detectors=[EveryFourth()], **options)
    for i in range(1, steps + 1):
        x = batches[i - 1] if batches is not None else torch.randn(4, 6, 3)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.step(torch.tensor(math.nan) if i == nan_at else loss)
    if close:
        w.close()
    return w


def log_sink(w) -> RunLogSink:
    return next(s for s in w.sinks if isinstance(s, RunLogSink))


def same(a, b) -> bool:
    """Equal numbers, NaN equal to NaN."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def same_record(a: Record, b: Record) -> bool:
    return (a.step == b.step and same(a.loss, b.loss) and same(a.val_loss, b.val_loss) and a.modules == b.modules
            and a.stats.keys() == b.stats.keys() and all(same(a.stats[k], b.stats[k]) for k in a.stats)
            and a.curves.keys() == b.curves.keys()
            and all(len(a.curves[k]) == len(b.curves[k]) and all(map(same, a.curves[k], b.curves[k]))
                    for k in a.curves))


# Inputs no statistic would produce by chance, so the file can be searched for them.
_gen = torch.Generator().manual_seed(1)
BATCHES = [torch.rand(4, 6, 3, generator=_gen) * 7 + 3 for _ in range(10)]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One watched run of 10 steps, logged every 2, with events at 4, 6 and 8: (watcher, its log)."""
    folder = tmp_path_factory.mktemp("runs")
    w = train(batches=BATCHES, log_dir=folder)
    return w, log_sink(w).path


@pytest.fixture
def copy(full, tmp_path):
    """A copy of the full run's log, to cut or spoil."""
    path = tmp_path / full[1].name
    path.write_bytes(full[1].read_bytes())
    return path


def test_round_trip(full):
    w, path = full
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{os.getpid()}\.jsonl", path.name)
    run = lstmwatch.load(path)
    # steps 1, 2, 4, 6, 8, 10; NaN where a statistic is undefined (the reverse direction's ratio) stays NaN
    assert len(run.records) == len(w.records) == 6 and all(map(same_record, run.records, w.records))
    assert run.events == list(w.events) and [e.step for e in run.events] == [4, 6, 8]
    assert run.modules == w.modules == ["body.enc", "dec"]
    assert run.complete and run.steps == run.step_count == 10
    assert same_record(run.latest, w.latest)
    assert run.summary() == w.summary()
    assert lstmwatch.load(path.parent).path == path  # a log_dir: its newest run
    # Records and events lie in the order they happened: each event right after its step's record.
    kinds = [(o["type"], o.get("step")) for o in map(json.loads, path.read_text().splitlines())]
    assert kinds[:6] == [("header", None), ("record", 1), ("record", 2), ("record", 4), ("event", 4), ("record", 6)]
    assert kinds[-1] == ("end", None)


def test_header(full):
    w, path = full
    h = load(path).header
    assert h["type"] == "header" and h["format"] == 1
    assert (h["lstmwatch"], h["torch"], h["python"]) == (lstmwatch.__version__, torch.__version__,
                                                         platform.python_version())
    assert h["sample"] == 8
    assert [m["name"] for m in h["modules"]] == ["body.enc", "dec"]
    run = load(path)
    for p in w.probes:
        assert run.configs[p.name] == {"kind": "lstm", **p.describe()}
    assert run.configs["body.enc"]["num_layers"] == 2 and run.configs["dec"]["bidirectional"] is True


def test_explicit_log_path(tmp_path):
    w = train(steps=1, log_path=tmp_path / "sub" / "run.jsonl")
    assert log_sink(w).path == tmp_path / "sub" / "run.jsonl"
    assert len(load(tmp_path / "sub" / "run.jsonl").records) == 1


def test_flushed_on_each_logging_step(tmp_path):
    w = train(steps=5, close=False, log_dir=tmp_path)
    run = load(log_sink(w).path)  # read while the run goes on, as after a crash
    assert [r.step for r in run.records] == [1, 2, 4] and [e.step for e in run.events] == [4]
    assert not run.complete and run.steps is None and run.step_count == 4
    w.close()
    w.close()
    assert load(log_sink(w).path).complete


def test_two_runs_in_one_second_get_two_files(tmp_path):
    a, b = train(steps=1, log_dir=tmp_path), train(steps=1, log_dir=tmp_path)
    assert log_sink(a).path != log_sink(b).path and len(list(tmp_path.iterdir())) == 2
    assert len(load(log_sink(b).path).records) == 1
    assert lstmwatch.load(tmp_path).path == newest(tmp_path) == log_sink(b).path  # the second run is the newest


@pytest.mark.parametrize("keep", [1, 10, -2, -1])
def test_cut_off_last_line_loads_up_to_it(full, copy, keep):
    w, path = full[0], copy
    lines = path.read_bytes().splitlines(keepends=True)
    last_record = max(i for i, ln in enumerate(lines) if b'"type":"record"' in ln)
    cut = lines[last_record]
    # A crash while writing the last record: the file ends inside (or right before the newline of) it.
    path.write_bytes(b"".join(lines[:last_record]) + cut[:keep if keep > 0 else len(cut) + keep])
    run = load(path)
    if keep == -1:  # the whole JSON object made it, only the newline is missing: the record is kept
        assert len(run.records) == len(w.records) and all(map(same_record, run.records, w.records))
    else:
        assert len(run.records) == len(w.records) - 1 and all(map(same_record, run.records, w.records))
    assert run.events == list(w.events) and not run.complete


@pytest.mark.parametrize("bad", [
    b"{not json\n",
    b'{"type": "record", "step": 3, "loss": 1.0, "stats": [1, 2]}\n',
    b'{"type": "record", "step": "3", "loss": 1.0, "stats": {}}\n',
    b'{"type": "record", "step": 3, "loss": 1.0, "stats": {"a": "abc"}}\n',
    b'{"type": "event", "step": 3, "kind": "x", "severity": "fatal", "module": "", "message": "", "hint": ""}\n',
    b'{"type": "header", "format": 1, "modules": []}\n',
    b"[1, 2, 3]\n",
])
def test_malformed_middle_line_names_file_and_line(copy, bad):
    path = copy
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [bad] + lines[2:]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: "):
        load(path)


def test_not_a_run_log(tmp_path):
    empty, other = tmp_path / "empty.jsonl", tmp_path / "other.jsonl"
    empty.write_text("")
    other.write_text('{"type": "record", "step": 1, "loss": 1.0, "stats": {}}\n')
    with pytest.raises(ValueError, match="no header"):
        load(empty)
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))}, line 1: .*header"):
        load(other)
    with pytest.raises(FileNotFoundError):
        lstmwatch.load(tmp_path / "missing.jsonl")
    (tmp_path / "no-logs").mkdir()
    with pytest.raises(FileNotFoundError, match="no lstmwatch run log"):
        lstmwatch.load(tmp_path / "no-logs")


def test_nonfinite_values_survive(tmp_path):
    nan, inf = math.nan, math.inf
    rec = Record(step=3, loss=nan, stats={"loss": nan, "grad_norm": inf, "m/l0/x": -inf, "m/l0/y": 0.5},
                 curves={"m/gtt": [1.0, nan, inf, -inf]}, val_loss=-inf, modules=("m",))
    sink = RunLogSink(path=tmp_path / "nan.jsonl")
    sink.write(rec, [Event(3, "nonfinite", "error", "m", "NaN in the loss", "lower the learning rate",
                           where="loss", values={"first": 3.0, "norm": nan, "peak": inf})])
    sink.close(Summary(3))
    text = (tmp_path / "nan.jsonl").read_text()
    # Standard JSON throughout: no bare NaN or Infinity tokens.
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    run = load(tmp_path / "nan.jsonl")
    assert len(run.records) == 1 and same_record(run.records[0], rec)
    assert run.events[0].kind == "nonfinite" and run.modules == ["m"]
    assert run.events[0].where == "loss" and run.events[0].values["first"] == 3.0
    assert math.isnan(run.events[0].values["norm"]) and run.events[0].values["peak"] == inf
    assert run.complete and run.steps == 3


def test_nonfinite_loss_in_a_real_run(tmp_path):
    w = train(steps=4, nan_at=4, log_dir=tmp_path)
    run = load(log_sink(w).path)
    last = run.records[-1]
    assert math.isnan(last.loss) and last.stats["nonfinite_loss"] == 4
    assert all(same_record(a, b) for a, b in zip(run.records, w.records))


def test_no_data_samples_in_the_file(full):
    # The file may hold at most one input value per record (data/absmax is the largest |x|),
    # never a sequence or a batch of them.
    w, path = full
    numbers: list[float] = []

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, float):
            numbers.append(o)

    lines = path.read_text().splitlines()
    for line in lines:
        walk(json.loads(line))
    inputs = {float(v) for b in BATCHES for v in b.flatten().tolist()}
    found = [v for v in numbers if v in inputs]
    assert len(found) <= len(w.records), found
    assert len(lines) == 1 + len(w.records) + len(w.events) + 1


def test_make_sinks_options(tmp_path):
    sinks = make_sinks(console=False, log_dir=tmp_path)
    assert len(sinks) == 1 and isinstance(sinks[0], RunLogSink) and sinks[0].path.parent == tmp_path
    assert make_sinks(console=False, log_path=tmp_path / "a.jsonl")[0].path == tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match="not both"):
        make_sinks(log_dir=tmp_path, log_path=tmp_path / "a.jsonl")
    with pytest.raises(TypeError, match="log_folder"):
        make_sinks(log_folder=tmp_path)
    with pytest.raises(TypeError, match="log_folder"):
        lstmwatch.watch(nn.LSTM(3, 8), log_folder=tmp_path)
    # No file for a watch() that fails: the file is created once the watcher exists.
    with pytest.raises(ValueError, match="no nn.LSTM"):
        lstmwatch.watch(nn.Linear(3, 3), log_dir=tmp_path / "never")
    assert list((tmp_path / "never").iterdir()) == []


# --- the sink protocol, events' where and values, old logs

def test_sink_writes_what_it_is_given_and_holds_no_watcher(tmp_path):
    header = Header.of([ModuleInfo("enc", "lstm", {"hidden_size": 8})], log_every=5, sample=4)
    sink = RunLogSink(path=tmp_path / "r.jsonl")
    sink.start(header)
    rec = Record(step=5, loss=0.5, stats={"loss": 0.5, "enc/grad_norm": 1.0}, modules=("enc",))
    ev = Event(5, "exploding_gradient", "warning", "enc", "m", "h", where="l0", values={"ratio": 12.5})
    sink.write(rec, [ev])
    sink.close(Summary(steps=7, records=1, events=1))
    sink.close(Summary(steps=8))  # a second close writes nothing
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [o["type"] for o in lines] == ["header", "record", "event", "end"]
    # The header line is the Header's values, in the order the file has always had, plus type and format.
    assert list(lines[0]) == ["type", "format", "lstmwatch", "torch", "python", "pid", "created", "log_every",
                              "sample", "modules", "world_size", "name"]
    assert lines[0] == {"type": "header", "format": FORMAT, **header.as_dict()}
    assert "modules" not in lines[1]  # the header's modules: not repeated on every record
    assert lines[2]["where"] == "l0" and lines[2]["values"] == {"ratio": 12.5}
    assert lines[3] == {"type": "end", "steps": 7}
    run = load(tmp_path / "r.jsonl")
    assert run.events == [ev] and run.steps == 7 and run.configs == {"enc": {"kind": "lstm", "hidden_size": 8}}
    assert not any(isinstance(v, lstmwatch.Watcher) for v in vars(sink).values())


def test_a_log_written_before_where_and_values_still_loads(copy):
    lines = copy.read_text().splitlines(keepends=True)
    old = []
    for line in lines:
        obj = json.loads(line)
        if obj["type"] == "event":
            del obj["where"], obj["values"]
            line = json.dumps(obj) + "\n"
        old.append(line)
    copy.write_text("".join(old))
    run = load(copy)
    assert [(e.step, e.where, e.values) for e in run.events] == [(4, "", {}), (6, "", {}), (8, "", {})]


def test_keys_and_line_types_a_reader_does_not_know_are_skipped(copy):
    # What keeps the format number at 1 when a key is added: an older reader reads a newer file's lines.
    lines = copy.read_text().splitlines(keepends=True)
    obj = json.loads(lines[1])
    obj["from_the_future"] = {"x": 1}
    lines[1] = json.dumps(obj) + "\n"
    lines.insert(2, json.dumps({"type": "checkpoint", "step": 1}) + "\n")
    copy.write_text("".join(lines))
    assert len(load(copy).records) == 6
    head = json.loads(lines[0])
    head["format"] = FORMAT + 1
    lines[0] = json.dumps(head) + "\n"
    copy.write_text("".join(lines))
    with pytest.raises(ValueError, match="newer lstmwatch"):
        load(copy)


def test_a_live_run_is_the_run_its_log_reads_back(full):
    w, path = full
    live = Run.live(w.header, w.records, w.events, w.step_count, path)
    run = load(path)
    assert live.modules == run.modules and live.configs == run.configs
    assert live.steps == run.steps == live.step_count == 10 and live.complete and run.complete
    assert live.events == run.events and all(map(same_record, live.records, run.records))
    assert live.summary() == run.summary() and live.name == run.name == path.stem
    assert live.source == run.source == str(path)
    assert {k: v for k, v in run.header.items() if k not in ("type", "format", "created", "pid")} == {
        k: v for k, v in live.header.items() if k not in ("created", "pid")}
    assert Run.live(Header.of([]), [], [], 0).name == "run" and repr(Run({}))


# --- the newest log of a folder: one rule for lstmwatch.load and the CLI

def _log(path, created: str, mtime: float) -> None:
    header = json.loads(header_line(Header.of([ModuleInfo("lstm", "lstm")])))
    header["created"] = created
    path.write_text(json.dumps(header) + "\n" + json.dumps({"type": "end", "steps": 0}) + "\n")
    os.utime(path, (mtime, mtime))


def test_newest_is_the_run_started_last_whatever_the_names_and_times_of_the_files(tmp_path, capsys):
    now = time.time()
    # Started last, but its name sorts first and it was modified (copied) first.
    _log(tmp_path / "a-baseline.jsonl", "2024-05-02T10:00:00+00:00", now - 100)
    _log(tmp_path / "20240501-120000-77.jsonl", "2024-05-01T10:00:00+00:00", now - 10)
    _log(tmp_path / "zz-copied-in.jsonl", "2024-04-01T10:00:00+00:00", now)
    (tmp_path / "notes.jsonl").write_text('{"text": "not a run log"}\n')  # newest of all, not a run log
    (tmp_path / "dir.jsonl").mkdir()
    assert [p.name for p in run_logs(tmp_path)] == ["zz-copied-in.jsonl", "20240501-120000-77.jsonl",
                                                    "a-baseline.jsonl"]
    assert newest(tmp_path).name == "a-baseline.jsonl"
    assert lstmwatch.load(tmp_path).path == tmp_path / "a-baseline.jsonl"
    assert find_log(str(tmp_path)) == str(tmp_path / "a-baseline.jsonl")
    assert "newest of 3 run logs" in capsys.readouterr().err


def test_runs_started_in_the_same_second_are_ordered_by_the_writers_suffix(tmp_path):
    now = time.time()
    same = "2024-05-01T10:00:00+00:00"
    # By name '-2' sorts before its first run and '-10' before '-9'; by mtime the first run is newest.
    for i, n in enumerate(["", "-2", "-9", "-10"]):
        _log(tmp_path / f"20240501-120000-77{n}.jsonl", same, now - i)
    assert newest(tmp_path).name == lstmwatch.load(tmp_path).path.name == "20240501-120000-77-10.jsonl"
    assert os.path.basename(find_log(str(tmp_path))) == "20240501-120000-77-10.jsonl"


def test_no_run_log_in_a_folder(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(FileNotFoundError, match="no lstmwatch run log"):
        lstmwatch.load(tmp_path)
    assert run_logs(tmp_path) == []
