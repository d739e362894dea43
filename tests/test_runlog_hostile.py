"""The run log against files and places it did not make: hostile lines are refused naming file and line, in
bounded memory and with a short message; a place that cannot hold the log is refused when watch() is called;
a write that fails mid-run leaves a log that still loads and a sink that raises no more."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.interfaces import Header, ModuleInfo, Summary
from lstmwatch.record import Record
from lstmwatch.runlog import format as fmt
from lstmwatch.runlog import load, newest, run_logs
from lstmwatch.runlog.format import MAX_LINE, header_line, short
from lstmwatch.sinks import RunLogSink

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
HEADER = header_line(Header.of([ModuleInfo("lstm", "lstm", {"hidden_size": 4})])).encode()
END = b'{"type":"end","steps":1}\n'
MESSAGE_MAX = 600  # characters of an error message, the file's path aside


def record(stats_value: bytes = b"1.0", **extra: bytes) -> bytes:
    rest = b"".join(b',"%s":%s' % (k.encode(), v) for k, v in extra.items())
    return b'{"type":"record","step":1,"loss":1.0,"val_loss":null,"stats":{"a":' + stats_value + b"}" + rest + b"}\n"


def refused(path: Path, line: int) -> str:
    """load(path)'s ValueError, checked to name the file and the line and to be short; its message."""
    with pytest.raises(ValueError) as info:
        load(path)
    msg = str(info.value)
    assert f"{path}, line {line}: " in msg, msg[:300]
    assert len(msg) - len(str(path)) < MESSAGE_MAX, f"a {len(msg):,}-character message: {msg[:300]}"
    return msg


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_VALUES = {
    "deep_nesting": (DEEP, "nested too deep"),
    "deep_objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deep"),
    "5000_digits": (b"7" * 5000, "digits"),
    "4000_digits": (b"7" * 4000, "beyond the range of a float"),  # under Python's digit limit, over a float's
    "1mb_string": (b'"' + b"x" * 1_000_000 + b'"', "should be a number"),
    "100k_list": (b"[" + b"0," * 99_999 + b"0]", "should be a number"),
    "nested_list": (b"[[[[[[1]]]]]]", "should be a number"),
    "not_utf8": (b'"\xff\xfe"', "not valid JSON"),
}


@pytest.mark.parametrize("value", list(HOSTILE_VALUES))
def test_a_hostile_stats_value_is_refused_naming_file_and_line(value, tmp_path):
    path = tmp_path / "hostile.jsonl"
    stats_value, said = HOSTILE_VALUES[value]
    path.write_bytes(HEADER + record(stats_value) + END)
    assert said in refused(path, 2)


@pytest.mark.parametrize("where", ["key", "step", "type", "modules", "severity", "header_format"])
def test_no_whole_value_in_a_message_wherever_it_stands(where, tmp_path):
    path = tmp_path / "hostile.jsonl"
    big = b'"' + b"k" * 1_000_000 + b'"'
    header, line = HEADER, record()
    if where == "key":
        line = b'{"type":"record","step":1,"loss":1.0,"stats":{' + big + b':"x"}}\n'
    elif where == "step":
        line = b'{"type":"record","step":' + b"9" * 4000 + b',"loss":1.0,"stats":{}}\n'
    elif where == "type":
        line = b'{"type":[' + b"1," * 100_000 + b"1]}\n"
    elif where == "modules":
        line = record(modules=b"[" + b"[1]," * 100_000 + b"1]")
    elif where == "severity":
        line = (b'{"type":"event","step":1,"kind":"x","severity":' + big
                + b',"module":"","message":"","hint":""}\n')
    else:
        obj = json.loads(HEADER)
        header = json.dumps({**obj, "format": 10**3999, "lstmwatch": "9" * 1_000_000}).encode() + b"\n"
    path.write_bytes(header + line + END)
    refused(path, 1 if where == "header_format" else 2)


def test_a_hostile_header_is_refused_at_line_1_and_passed_over_when_finding_the_newest(tmp_path):
    for name, value in [("deep", DEEP), ("digits", b"7" * 5000)]:
        (tmp_path / f"{name}.jsonl").write_bytes(b'{"type":"header","format":1,"x":' + value + b"}\n" + END)
        refused(tmp_path / f"{name}.jsonl", 1)
    good = tmp_path / "good.jsonl"
    good.write_bytes(HEADER + record() + END)
    assert run_logs(tmp_path) == [good] and newest(tmp_path) == good and len(load(tmp_path).records) == 1


def test_a_hostile_last_line_cut_off_is_dropped_like_any_cut_off_line(tmp_path):
    # No newline: a line the writer never finished, whatever it holds; the log loads up to it.
    path = tmp_path / "cut.jsonl"
    path.write_bytes(HEADER + record() + record(DEEP)[:-1])
    run = load(path)
    assert len(run.records) == 1 and not run.complete


def test_the_line_cap_is_exact_and_an_overlong_line_is_refused_even_last(tmp_path):
    path = tmp_path / "cap.jsonl"
    line = record()
    pad = MAX_LINE - (len(line) - 1)  # JSON allows whitespace: a valid record line of MAX_LINE bytes exactly
    longest = line[:-2] + b" " * pad + b"}\n"
    assert len(longest) == MAX_LINE + 1
    path.write_bytes(HEADER + longest + END)
    assert len(load(path).records) == 1 and load(path).complete
    path.write_bytes(HEADER + longest[:-2] + b" }\n" + END)  # one byte more
    assert "longer than 16 MiB" in refused(path, 2)
    path.write_bytes(HEADER + longest[:-2] + b" }")  # the same, last and without its newline: still refused
    refused(path, 2)


_LOAD_MEASURED = """
import json, resource, sys, time
import lstmwatch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    lstmwatch.load(sys.argv[1])
    got = {"error": None}
except ValueError as exc:
    got = {"error": str(exc)}
got["seconds"] = time.perf_counter() - t
got["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(got))
"""


def test_a_200mb_line_is_refused_in_bounded_memory_and_time(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(HEADER + b'{"type":"record","step":1,"loss":1.0,"stats":{"a":[')
        chunk = b"0," * (1 << 20)
        for _ in range(100):
            f.write(chunk)
        f.write(b"0]}}\n" + END)
    assert path.stat().st_size > 200 * 1024 * 1024
    proc = subprocess.run([sys.executable, "-c", _LOAD_MEASURED, str(path)], capture_output=True, text=True,
                          timeout=100, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["error"] and f"{path}, line 2: " in got["error"] and "longer than 16 MiB" in got["error"]
    assert len(got["error"]) < MESSAGE_MAX + len(str(path))
    # One capped line read (16 MiB) and nothing parsed: well under the 1 GB a whole read and split took.
    assert got["growth_mb"] < 3 * MAX_LINE / 2**20, got
    assert got["seconds"] < 5, got


def test_short_is_bounded_whatever_the_value():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for x in (deep, 10**3999, 10**5000, "x" * 10**6, list(range(10**5)), {str(i): i for i in range(10**4)}):
        assert len(short(x)) <= 80
    assert short("abc") == "'abc'" and short(1.5) == "1.5"


def test_a_record_too_long_for_a_line_is_written_without_its_curves(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "MAX_LINE", 4096)
    rec = Record(step=1, loss=0.5, stats={"loss": 0.5, "m/grad_norm": 2.0}, curves={"m/gtt": [0.25] * 1000},
                 modules=("m",))
    line = fmt.record_line(rec, ("m",))
    assert len(line) <= 4096 and json.loads(line)["curves_omitted"] == 1
    sink = RunLogSink(path=tmp_path / "r.jsonl")
    sink.write(rec)
    sink.close(Summary(1))
    monkeypatch.undo()
    back = load(tmp_path / "r.jsonl").records[0]
    assert back.stats == rec.stats and back.curves == {}
    small = Record(step=1, loss=0.5, stats={"loss": 0.5}, curves={"m/gtt": [0.25] * 10}, modules=("m",))
    assert "curves_omitted" not in fmt.record_line(small, ("m",))


# --- where the log goes


def test_a_place_that_cannot_hold_the_log_is_refused_by_watch_naming_the_option(tmp_path):
    a_file = tmp_path / "not_a_folder.jsonl"
    a_file.write_text("")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    cases = [("log_dir", a_file, a_file), ("log_dir", a_file / "sub", a_file / "sub"),
             ("log_path", a_folder, a_folder), ("log_path", a_file / "run.jsonl", a_file / "run.jsonl")]
    for option, place, named in cases:
        with pytest.raises(ValueError, match=rf"{option}=.*{re.escape(str(named))}"):
            lstmwatch.watch(nn.LSTM(3, 4), console=False, **{option: place})
        with pytest.raises(ValueError, match=option):
            RunLogSink(place) if option == "log_dir" else RunLogSink(path=place)
    assert a_file.read_text() == "" and list(a_folder.iterdir()) == []


def _open_on(path: str | Path) -> list[int]:
    """The descriptors this process has open on `path` (Linux)."""
    return [int(fd) for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)]


def _disk_full(path: Path) -> None:
    """From now on, writes to the open log at `path` fail with ENOSPC: /dev/full takes its descriptor's place."""
    [fd] = _open_on(path)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full") or not os.path.isdir("/proc/self/fd"),
                                    reason="needs Linux's /dev/full")


@needs_dev_full
def test_a_write_that_fails_raises_once_then_the_sink_is_quiet_and_the_log_loads(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = RunLogSink(path=path)
    sink.start(Header.of([ModuleInfo("m", "lstm")]))
    rec = Record(step=1, loss=0.5, stats={"loss": 0.5}, modules=("m",))
    sink.write(rec)
    _disk_full(path)
    with pytest.raises(OSError):
        sink.write(Record(step=2, loss=0.4, stats={"loss": 0.4}, modules=("m",)))
    assert _open_on("/dev/full") == []  # closed at once: nothing left to fail again at collection
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unraisable error at garbage collection would show here
        sink.write(Record(step=3, loss=0.3, stats={"loss": 0.3}, modules=("m",)))  # nothing, no error
        sink.close(Summary(3))
        sink.close(Summary(3))
    run = load(path)
    assert [r.step for r in run.records] == [1] and not run.complete


@needs_dev_full
def test_a_disk_full_mid_run_is_reported_once_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, batch_first=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_path=tmp_path / "r.jsonl", log_every=1, console=False) as w:
            for i in range(1, 6):
                if i == 3:
                    _disk_full(tmp_path / "r.jsonl")
                loss = model(torch.randn(2, 5, 3))[0].pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                w.step(loss)
    said = [str(x.message) for x in caught if issubclass(x.category, lstmwatch.LSTMWatchFailure)]
    assert len(said) == 1 and "RunLogSink.write" in said[0] and "No space" in said[0], said
    assert w.step_count == 5 and len(w.records) == 5
    assert [r.step for r in load(tmp_path / "r.jsonl").records] == [1, 2]
    assert _open_on("/dev/full") == []  # the sink closed its file when the write failed, not at collection


def test_a_long_real_run_loads_as_fast_as_before(tmp_path):
    # Reading line by line costs no more than the whole read did: 2,000 records of 200 statistics.
    path = tmp_path / "long.jsonl"
    stats = b"{" + b",".join(b'"m/l0/s%d":0.%d' % (i, i) for i in range(200)) + b"}"
    curve = b"[" + b"0.5," * 99 + b"0.5]"
    line = b'{"type":"record","step":1,"loss":1.0,"stats":' + stats + b',"curves":{"m/gtt":' + curve + b"}}\n"
    path.write_bytes(HEADER + line * 2000 + END)
    t = time.perf_counter()
    run = load(path)
    assert len(run.records) == 2000 and run.complete
    assert time.perf_counter() - t < 10
