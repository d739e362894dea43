"""The W&B sink against real W&B in offline mode, proved by reading the run's .wandb file back."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.events import Event, LSTMWatchWarning, Record
from lstmwatch.sinks import WandbSink, make_sinks

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.timeout(60)


# --- reading an offline run back
def wandb_records(path: Path) -> list[pb.Record]:
    """Every record of a .wandb file, parsed with wandb's own protobuf.

    The file is a LevelDB-style log (what wandb-core writes, and what `wandb sync` reads): a 7-byte
    header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32 of type and data, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter
    than a chunk header is zero padding.
    """
    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        if pos + 7 + n > len(data):  # still being written
            break
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pos += 7 + n
        buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


class Offline:
    """What an offline run wrote: history rows, the final summary, metric definitions, alerts, tables."""

    def __init__(self, root: Path):
        (self.file,) = root.glob("wandb/offline-run-*/run-*.wandb")
        self.files = self.file.parent / "files"
        self.rows: list[dict] = []
        self.summary: dict = {}
        self.metrics: list = []
        self.alerts: list = []
        # run.finish() can return before wandb-core has written the file's last records: wait for its exit record.
        deadline = time.monotonic() + 30
        records = wandb_records(self.file)
        while not records or records[-1].WhichOneof("record_type") != "exit":
            assert time.monotonic() < deadline, f"{self.file} has no exit record 30 s after run.finish()"
            time.sleep(0.05)
            records = wandb_records(self.file)
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {}
                for item in rec.history.item:
                    path = list(item.nested_key) or [item.key]
                    row[path[0] if len(path) == 1 else tuple(path)] = json.loads(item.value_json)
                assert row["_step"] == rec.history.step.num
                self.rows.append(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "metric":
                self.metrics.append(rec.metric)
            elif kind == "alert":
                self.alerts.append(rec.alert)

    def events_table(self) -> tuple[list[str], list[list]]:
        """The lstmwatch/events table: its columns and every row, over all its increments."""
        columns, rows, seen = None, [], set()
        for row in self.rows:
            path = row.get(("lstmwatch/events", "path"))
            if path is None or path in seen:
                continue
            seen.add(path)
            t = json.loads((self.files / path).read_text())
            columns = t["columns"]
            rows += t["data"]
        return columns, rows


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A real offline run under tmp_path; lstmwatch must never log in or start one itself."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = wandb.init(mode="offline", dir=tmp_path, project="lstmwatch-test", settings=wandb.Settings(console="off"))
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("lstmwatch called wandb.init"))
    monkeypatch.setattr(wandb, "login", lambda *a, **k: pytest.fail("lstmwatch called wandb.login"))
    yield r
    r.finish()


# --- a small real training run
class Flagger:
    """A stand-in detector: a warning at step 4, an error at 8."""

    kind = "flagger"

    def update(self, record: Record) -> list[Event]:
        if record.step == 4:
            return [Event(4, "stalled_loss", "warning", "lstm", "loss flat", "raise the learning rate")]
        if record.step == 8:
            return [Event(8, "exploding_gradient", "error", "lstm", "norm 40x its average", "clip at 1.0")]
        return []


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def train(user_log=None, steps=10, **options):
    """Train 10 steps; user_log(run_step_index, loss) is the user's own W&B logging, before watcher.step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lstmwatch.watch(model, log_every=2, console=False, detectors=[Flagger()], **options)
    for i in range(steps):
        loss = (model(torch.randn(4, 6, 3)) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if user_log is not None:
            user_log(i, loss.item())
        w.step(loss)
    w.close()
    return w


def lstmwatch_keys(row: dict) -> set:
    return {k for k in row if isinstance(k, str) and k.startswith("lstmwatch/")}


def expected_keys(record: Record) -> set:
    """The default selection: every scalar statistic but the per-parameter gradient norms."""
    return {"lstmwatch/step"} | {"lstmwatch/" + k for k in record.stats
                                 if not (k.endswith("/grad_norm") and k.split("/")[1].startswith(("weight_", "bias_")))}


def same(a, b) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_scalars_events_summary(run, tmp_path):
    w = train(user_log=lambda i, loss: run.log({"train/loss": loss}), wandb=True)
    run.finish()
    off = Offline(tmp_path)

    # The user's rows and steps are untouched: one row per run.log call, _step 0..9, every value there.
    user = [r for r in off.rows if "train/loss" in r]
    assert [r["_step"] for r in user] == list(range(10))
    # lstmwatch's values joined those rows: one row per record, bound to lstmwatch/step.
    ours = [r for r in off.rows if "lstmwatch/step" in r]
    assert [r["lstmwatch/step"] for r in ours] == [r.step for r in w.records] == [1, 2, 4, 6, 8, 10]
    for row, rec in zip(ours, w.records):
        assert lstmwatch_keys(row) - {"lstmwatch/events"} == expected_keys(rec)
        for k in expected_keys(rec) - {"lstmwatch/step"}:
            assert same(row[k], rec.stats[k[len("lstmwatch/"):]]), k
    first = ours[0]
    assert {"lstmwatch/loss", "lstmwatch/grad_norm", "lstmwatch/lstm/l0/forget/sat_right",
            "lstmwatch/lstm/l1/forget/grad_norm", "lstmwatch/lstm/grad_norm"} <= set(first)
    # Per-parameter norms and per-timestep curves stay out.
    assert not any("weight_" in k or "bias_" in k for r in ours for k in lstmwatch_keys(r))
    assert not any(k in r for r in ours for k in ("lstmwatch/lstm/gtt", "lstmwatch/lstm/l0/gtt"))
    assert max(len(lstmwatch_keys(r)) for r in ours) <= 100
    (glob,) = [m for m in off.metrics if m.glob_name == "lstmwatch/*"]
    assert glob.step_metric == "lstmwatch/step"

    # Events: the table, the summary, no alert from an offline run.
    columns, rows = off.events_table()
    assert columns == ["step", "kind", "severity", "module", "message", "hint"]
    assert rows == [[e.step, e.kind, e.severity, e.module, e.message, e.hint] for e in w.events]
    assert len(rows) == 2
    assert off.summary["lstmwatch/events_count"] == 2
    assert off.summary["lstmwatch/events_by_kind"] == {"stalled_loss": 1, "exploding_gradient": 1}
    assert off.summary["lstmwatch/last_event"]["kind"] == "exploding_gradient"
    assert off.alerts == []


def test_explicit_user_steps_never_dropped(run, tmp_path):
    # Two run.log calls per step with step= given: a row of lstmwatch's own would close the step early
    # and W&B would drop the second call. Every value of the user must be there.
    def user_log(i, loss):
        run.log({"train/loss": loss}, step=100 + i)
        run.log({"train/lr": 0.1 * i}, step=100 + i)

    w = train(user_log=user_log, wandb=run)
    run.finish()
    off = Offline(tmp_path)
    user = [r for r in off.rows if "train/loss" in r]
    assert [r["_step"] for r in user] == list(range(100, 110))
    assert [r["train/lr"] for r in user] == pytest.approx([0.1 * i for i in range(10)])
    assert sorted(r["lstmwatch/step"] for r in off.rows if "lstmwatch/step" in r) == [r.step for r in w.records]


# --- lstmwatch's values in the row of the user's values of the same training step
def loop(user, *, after: bool, steps: int = 12, log_every: int = 2, **options):
    """Train; at each training step t (1-based, as lstmwatch counts) the user's own logging user(t) runs
    after watcher.step(loss) if `after`, else before it."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lstmwatch.watch(model, log_every=log_every, console=False, **options)
    for t in range(1, steps + 1):
        loss = (model(torch.randn(4, 6, 3)) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not after:
            user(t)
        w.step(loss)
        if after:
            user(t)
    w.close()
    return w


def aligned(run, tmp_path, w, logged: list[int]) -> Offline:
    """The contract, from the rows read back: every value of the user's there (`logged`: the training steps
    they logged `train/step` of), every record's lstmwatch/step exactly once, and each record of a step the
    user logged in the row of their values of that step, no record in a row of theirs of another step."""
    run.finish()
    off = Offline(tmp_path)
    assert [r["train/step"] for r in off.rows if "train/step" in r] == logged
    ours = [r["lstmwatch/step"] for r in off.rows if "lstmwatch/step" in r]
    assert sorted(ours) == [r.step for r in w.records]
    both = [r for r in off.rows if "train/step" in r and "lstmwatch/step" in r]
    assert all(r["train/step"] == r["lstmwatch/step"] for r in both), [(r["train/step"], r["lstmwatch/step"])
                                                                      for r in both]
    assert {r["lstmwatch/step"] for r in both} == set(logged) & set(ours)
    return off


STEPS = {"step=t": lambda t: t, "step=t-1": lambda t: t - 1, "step=100+t": lambda t: 100 + t,
         "samples seen": lambda t: 32 * t}


@pytest.mark.parametrize("after", [True, False], ids=["log after step", "log before step"])
@pytest.mark.parametrize("scale", list(STEPS))
def test_explicit_steps_same_row(run, tmp_path, after, scale):
    # (a) watcher.step(loss); wandb.log(..., step=s): W&B keeps the row of the step before open until this
    # call, and the record of step t used to land there, one row off. (b) the user logs first.
    def user(t):
        run.log({"train/step": t}, step=STEPS[scale](t))
        run.log({"train/again": t}, step=STEPS[scale](t))  # a second call into the same row

    w = loop(user, after=after, wandb=run)
    off = aligned(run, tmp_path, w, list(range(1, 13)))
    user_rows = [r for r in off.rows if "train/step" in r]
    assert [r["_step"] for r in user_rows] == [STEPS[scale](t) for t in range(1, 13)]
    assert all(r["train/again"] == r["train/step"] for r in user_rows)


@pytest.mark.parametrize("after", [True, False], ids=["log after step", "log before step"])
def test_implicit_steps_same_row(run, tmp_path, after):
    # (c) no step=: each call commits its row, the next one opens.
    w = loop(lambda t: wandb.log({"train/step": t}), after=after, wandb=True)
    off = aligned(run, tmp_path, w, list(range(1, 13)))
    assert [r["_step"] for r in off.rows if "train/step" in r] == list(range(12))  # the user's count, ours apart


@pytest.mark.parametrize("after", [True, False], ids=["log after step", "log before step"])
@pytest.mark.parametrize("steps", [12, 14], ids=["ends on a user row", "ends after it"])
@pytest.mark.parametrize("explicit", [True, False], ids=["step=global step", "no step="])
def test_user_logs_every_k_steps(run, tmp_path, after, steps, explicit):
    # (d) the user logs every 3 steps, lstmwatch on its own schedule (1, 2, 4, 6, ...): records of the other
    # steps get rows of their own, never the user's.
    def user(t):
        if t % 3 == 0:
            run.log({"train/step": t}, step=t) if explicit else run.log({"train/step": t})

    w = loop(user, after=after, steps=steps, wandb=run)
    off = aligned(run, tmp_path, w, [t for t in range(1, steps + 1) if t % 3 == 0])
    if explicit:
        assert [r["_step"] for r in off.rows if "train/step" in r] == [3, 6, 9, 12]


def test_coarse_user_steps_are_never_dropped(run, tmp_path):
    # step= in epochs, while lstmwatch logs every step: there are fewer rows than records. The user's values
    # come first: all of them stay, at their steps, and lstmwatch says once that its records share rows.
    def user(t):
        if t % 4 == 0:
            run.log({"train/epoch": t // 4}, step=t // 4)

    with pytest.warns(LSTMWatchWarning, match="grow slower than the training step"):
        loop(user, after=True, log_every=1, wandb=run)
    run.finish()
    rows = [r for r in Offline(tmp_path).rows if "train/epoch" in r]
    assert [(r["_step"], r["train/epoch"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]


def test_records_wait_for_the_users_first_call_a_bounded_while(run, tmp_path, monkeypatch):
    # (e) no call of the user's yet: how they count rows is unknown, so records wait for it; MAX_HELD at most,
    # then they stream, a row each, and every one is there at the end.
    monkeypatch.setattr("lstmwatch.sinks.wandb.MAX_HELD", 3)
    model = Net()
    w = lstmwatch.watch(model, log_every=1, console=False, wandb=run)
    for _ in range(10):
        model(torch.randn(4, 6, 3)).sum().backward()
        w.step(1.0)
    assert run._local_step >= 10 - 3 - 1  # rows written while training, all but the few held
    w.close()
    run.finish()
    assert [r["lstmwatch/step"] for r in Offline(tmp_path).rows] == list(range(1, 11))


def test_records_held_when_the_user_finishes_the_run_first_are_logged(run, tmp_path):
    # wandb.finish() before watcher.close(), the user never logging: the held records go in at finish().
    model = Net()
    w = lstmwatch.watch(model, log_every=1, console=False, wandb=run)
    for _ in range(5):
        model(torch.randn(4, 6, 3)).sum().backward()
        w.step(1.0)
    run.finish()
    w.close()
    assert [r["lstmwatch/step"] for r in Offline(tmp_path).rows] == list(range(1, 6))
    assert run._log is not w.sinks[0]._own_log


def test_a_run_without_log_internals_gets_the_plain_merge():
    from lstmwatch.schedule import Clock

    run = StubRun()  # no run._log: nothing to stand in for
    sink = WandbSink(run)
    sink.follow(Clock.start(1))
    sink.write(Record(1, 1.0, {"loss": 1.0}))
    sink.write(Record(2, 1.0, {"loss": 1.0}))
    assert [d.get("lstmwatch/step") for d in run.logged] == [1, None, 2] and run._local_step == 1


def test_the_runs_log_is_its_own_again_after_close(run):
    w = lstmwatch.watch(Net(), console=False, wandb=run)
    assert "_log" in vars(run)
    w.close()
    assert "_log" not in vars(run)


def test_a_row_per_record_when_the_user_logs_nothing(run, tmp_path):
    w = train(wandb=run)
    run.finish()
    off = Offline(tmp_path)
    assert [r["lstmwatch/step"] for r in off.rows] == [r.step for r in w.records]
    assert [r["lstmwatch/loss"] for r in off.rows] == [r.loss for r in w.records]


def test_nonfinite_values_and_key_options(run, tmp_path):
    stats = {"loss": math.nan, "grad_norm": math.inf, "m/l0/forget/mean": 0.5, "m/weight_ih_l0/grad_norm": 1.0,
             "m/l0/forget/grad_norm": 2.0}
    sinks = [WandbSink(run), WandbSink(run, keys="all"), WandbSink(run, keys=["loss", "*/forget/*"])]
    for sink in sinks:
        sink.start()
    for step, sink in enumerate(sinks, 1):
        sink.write(Record(step, math.nan, dict(stats), curves={"m/gtt": [1.0, 2.0]}))
        run.log({"user": step})  # three sinks on one run: the user's row closes each one's values
    run.finish()
    rows = {r["lstmwatch/step"]: r for r in Offline(tmp_path).rows}
    assert math.isnan(rows[1]["lstmwatch/loss"]) and rows[1]["lstmwatch/grad_norm"] == math.inf
    assert lstmwatch_keys(rows[1]) == {"lstmwatch/step", "lstmwatch/loss", "lstmwatch/grad_norm",
                                       "lstmwatch/m/l0/forget/mean", "lstmwatch/m/l0/forget/grad_norm"}
    assert "lstmwatch/m/weight_ih_l0/grad_norm" in rows[2] and len(lstmwatch_keys(rows[2])) == 6
    assert lstmwatch_keys(rows[3]) == {"lstmwatch/step", "lstmwatch/loss", "lstmwatch/m/l0/forget/mean",
                                       "lstmwatch/m/l0/forget/grad_norm"}


class StubRun:
    """A stand-in for an online run: what lstmwatch calls on it."""

    offline = disabled = False

    def __init__(self):
        self.logged, self.alerts, self.summary, self._local_step = [], [], {}, 0

    def define_metric(self, *a, **k):
        pass

    def log(self, data, commit=None):
        self.logged.append(dict(data))
        if commit:
            self._local_step += 1

    def alert(self, **kw):
        self.alerts.append(kw)


def test_alerts_when_online_and_the_key_cap():
    run = StubRun()
    sink = make_sinks(console=False, wandb=run)[0]
    sink.emit(Event(4, "stalled_loss", "warning", "encoder.lstm", "loss flat", "raise the learning rate"))
    sink.emit(Event(4, "gate_saturation", "info", "", "a note", "none"))
    sink.emit(Event(8, "nonfinite", "error", "", "NaN in the loss " * 10, "lower the learning rate"))
    assert [a["level"] for a in run.alerts] == ["WARN", "ERROR"]
    assert run.alerts[0]["title"] == "lstmwatch: stalled_loss in encoder.lstm"
    assert "raise the learning rate" in run.alerts[0]["text"] and all(len(a["title"]) < 64 for a in run.alerts)
    assert run.summary["lstmwatch/events_count"] == 3

    capped = WandbSink(StubRun(), max_keys=3)
    rec = Record(2, 1.0, {"m/l0/a": 1.0, "m/l0/b": 1.0, "loss": 1.0, "m/l1/a": 1.0, "grad_norm": 1.0})
    with pytest.warns(LSTMWatchWarning, match="first 3"):
        capped.write(rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped.write(rec)  # warned once only
    assert set(capped.run.logged[0]) == {"lstmwatch/step", "lstmwatch/loss", "lstmwatch/grad_norm", "lstmwatch/m/l0/a"}


def test_no_active_run_is_an_error_at_watch_time(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("lstmwatch called wandb.init"))
    monkeypatch.setattr(wandb, "login", lambda *a, **k: pytest.fail("lstmwatch called wandb.login"))
    assert wandb.run is None
    with pytest.raises(RuntimeError, match=r"wandb\.init"):
        lstmwatch.watch(nn.LSTM(3, 8), wandb=True)
    with pytest.raises(TypeError, match="wandb="):
        lstmwatch.watch(nn.LSTM(3, 8), wandb="online")
    with pytest.raises(TypeError, match="wandb_key"):
        make_sinks(wandb_key="all")
    with pytest.raises(TypeError, match="wandb_keys must be"):
        make_sinks(wandb=StubRun(), wandb_keys=5)
    assert make_sinks(console=False, wandb=False) == make_sinks(console=False, wandb=None) == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ImportError, match=r"lstmwatch\[wandb\]"):
        make_sinks(wandb=True)


def test_finished_run_before_close_stays_quiet(run):
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = lstmwatch.watch(model, log_every=1, console=False, detectors=[Flagger()], wandb=True)
        for _ in range(4):
            model(torch.randn(4, 6, 3)).sum().backward()
            w.step(1.0)
        run.finish()
        w.step(1.0)
        w.close()
    with pytest.raises(ValueError, match="finished"):
        WandbSink(run)


def test_import_lstmwatch_does_not_import_wandb():
    code = "import sys, lstmwatch, lstmwatch.sinks; lstmwatch.sinks.make_sinks(); assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
