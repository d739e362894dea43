"""Never break, flood or mark a real training run.

The contract, one test per item:
1. lstmwatch never interrupts training, and legal uses of an LSTM stay watched;
2. bad arguments are refused clearly, at the call that made them;
3. it does not flood the console, and keeps the first event of each kind;
4. it leaves no mark: copies, pickles, the warnings registry, the loop's locals, threads;
5. it says what it cannot see (step() never called), and reads a hostile run log without harm.

Each test trains tiny models for a few steps, seeds fixed, and compares the watched run against the same model
trained unwatched: every parameter bit-identical. Only the public API is used.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
import warnings
import weakref
from collections import Counter

import pytest
import torch
from field_models import (
    SEED,
    B,
    F,
    H,
    LastStep,
    T,
    Tagger,
    assert_params_equal,
    assert_watched_after,
    batches,
    compare,
    forward_hook_count,
    grad_hook_count,
    mean_loss,
    stray_tensors,
    train,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

import lstmwatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_of(model, x):
    return model(x)


# ======================================================================================================
# 1. It never interrupts training; legal uses complete and stay watched
# ======================================================================================================


class OutputOnlyLSTM(nn.LSTM):
    """Returns only the output sequence: fits nn.Sequential."""

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own name
        return super().forward(input, hx)[0]


def test_lstm_subclass_returning_only_its_output_in_sequential():
    pair = compare(lambda: nn.Sequential(OutputOnlyLSTM(F, H), LastStep(), nn.Linear(H, 1)), batches(6),
                   lambda m, x: mean_loss(m(x)), log_every=1)
    assert_watched_after(pair.watcher, after=1)


class DictLSTM(nn.LSTM):
    """Returns a dict."""

    def forward(self, input, hx=None):  # noqa: A002
        out, (h, c) = super().forward(input, hx)
        return {"output": out, "h_n": h, "c_n": c}


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = DictLSTM(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        return mean_loss(self.head(self.rnn(x)["h_n"][-1]))


def test_lstm_subclass_returning_a_dict():
    pair = compare(DictModel, batches(6), loss_of, log_every=1)
    assert_watched_after(pair.watcher, after=1)


class PackingLSTM(nn.LSTM):
    """Takes (x, lengths) and packs inside: the hook sees a padded tensor and lengths, and returns h_n[-1]."""

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=False)
        _, (h, _) = super().forward(packed)
        return h[-1]


class PackingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = PackingLSTM(F, H, batch_first=True)
        self.head = nn.Linear(H, 1)

    def forward(self, x, lengths):
        return mean_loss(self.head(self.rnn(x, lengths)))


def _padded(n):
    g = torch.Generator().manual_seed(SEED + 7)
    out = []
    for x in batches(n, batch_first=True):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        out.append((x * mask[..., None], lengths))
    return out


def test_lstm_subclass_taking_lengths_and_packing_inside():
    pair = compare(PackingModel, _padded(6), lambda m, b: m(*b), log_every=1)
    assert_watched_after(pair.watcher, after=1)


@pytest.mark.parametrize("registered", ["before_watch", "after_watch"])
def test_users_forward_hook_returning_out0(registered):
    def hook(module, args, out):
        return out[0]

    def build():
        model = Tagger()
        if registered == "before_watch":
            model.rnn.register_forward_hook(hook)
        return model

    def after(model):
        if registered == "after_watch":
            model.rnn.register_forward_hook(hook)

    def forward(model, x):  # the user's code reads the hook's output: a tensor
        return mean_loss(model.head(model.rnn(x)).transpose(0, 1).flatten(1))

    pair = compare(build, batches(6), forward, after_watch=after, log_every=1)
    assert_watched_after(pair.watcher, after=1)


class Checkpointed(nn.Module):
    """A linear layer, then the LSTM under torch.utils.checkpoint, then a head."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.pre = nn.Linear(F, F)  # the checkpointed input requires grad (reentrant checkpoint needs it)
        self.rnn = nn.LSTM(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        out = checkpoint(lambda z: self.rnn(z)[0], self.pre(x), use_reentrant=self.reentrant)
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


@pytest.mark.parametrize("reentrant", [False, True], ids=["use_reentrant=False", "use_reentrant=True"])
def test_checkpoint_around_the_lstm(reentrant):
    pair = compare(lambda: Checkpointed(reentrant), batches(6), loss_of, log_every=1)
    assert_watched_after(pair.watcher, after=1)


class ListStateLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        b = x.shape[1]
        h0, c0 = torch.full((1, b, H), 0.1), torch.full((1, b, H), -0.1)
        out, _ = self.rnn(x, [h0, c0])  # a list, which nn.LSTM accepts
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


class ListStateCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(F, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x):
        h = c = torch.zeros(x.shape[1], H)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], [h, c])  # a list, which nn.LSTMCell accepts
        return mean_loss(self.head(h))


@pytest.mark.parametrize("build", [ListStateLSTM, ListStateCell], ids=["nn.LSTM", "nn.LSTMCell"])
def test_initial_state_given_as_a_list(build):
    pair = compare(build, batches(6), loss_of, log_every=1)
    assert_watched_after(pair.watcher, after=1)


def test_step_with_loss_then_step_without():
    def step(w, i, loss):
        return w.step(loss) if i <= 6 else w.step()

    pair = compare(Tagger, batches(14), loss_of, step=step, log_every=1)
    assert pair.watcher.step_count == 14
    assert [r.step for r in pair.watcher.records] == list(range(1, 15))
    assert_watched_after(pair.watcher, after=6)


def test_empty_batch_on_a_logging_step_then_a_later_fault_is_still_found():
    """Step 3 (logged) has a batch of 0; steps 4-6 are normal; from step 7 on the inputs are *1000."""
    data = batches(10)
    data[2] = torch.randn(T, 0, F)
    data[6:] = [x * 1000 for x in data[6:]]
    pair = compare(Tagger, data, loss_of, log_every=1)
    assert_watched_after(pair.watcher, after=3)
    found = [w for w in pair.warned(lstmwatch.UnnormalizedInputWarning)]
    assert found, (f"the inputs *1000 from step 7 were not reported after the empty batch of step 3; "
                   f"lstmwatch said: {[str(w.message)[:200] for w in pair.log]}")


def test_model_on_the_meta_device():
    with torch.device("meta"):
        model = Tagger()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        w = lstmwatch.watch(model)
        w.close()


class LazySettings:
    """A lazy settings proxy, as frameworks put in a training script's globals: any attribute access raises
    until it is configured, `__class__` too. Every access is written down."""

    touched: list[str] = []

    def __getattr__(self, name):
        LazySettings.touched.append(name)
        raise RuntimeError(f"settings not configured (asked for {name})")

    @property
    def __class__(self):  # noqa: PLE0101 - the point: isinstance() reads it when the type does not match
        LazySettings.touched.append("__class__")
        raise RuntimeError("settings not configured (asked for __class__)")


_TRAIN_SCRIPT = '''
import torch

settings = LazySettings()          # a module-level global of the training script


def fit(model, data, watcher):
    config = LazySettings()        # and one among the training loop's locals
    torch.manual_seed(SEED + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in data:
        loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if watcher is not None:
            watcher.step(loss)
'''


def test_scaler_search_never_touches_the_training_scripts_objects(tmp_path):
    script = types.ModuleType("user_train_script")
    script.__file__ = str(tmp_path / "user_train_script.py")
    script.__dict__.update(LazySettings=LazySettings, SEED=SEED)
    exec(compile(_TRAIN_SCRIPT, script.__file__, "exec"), script.__dict__)  # noqa: S102 - the user's script
    data = batches(4)
    torch.manual_seed(SEED)
    plain = Tagger()
    torch.manual_seed(SEED)
    model = Tagger()
    script.fit(plain, data, None)
    LazySettings.touched.clear()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_every=1) as w:
            script.fit(model, data, w)
    assert LazySettings.touched == [], f"lstmwatch touched the script's objects: {LazySettings.touched}"
    assert_params_equal(plain, model)
    assert_watched_after(w)


# ======================================================================================================
# 2. Bad arguments are refused clearly, at the call that made them
# ======================================================================================================


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"sample": 2.5}, "sample"),
    ({"modules": 123}, "modules"),
    ({"log_dir": "FILE"}, "log_dir"),
    ({"detectors": {"padding": 5}}, "detectors|padding"),
    ({"detectors": ["x"]}, "detectors"),
    ({"scaler": "s"}, "scaler"),
], ids=["sample=2.5", "modules=123", "log_dir=a_file", "detectors={padding:5}", "detectors=[x]", "scaler=s"])
def test_watch_refuses_a_bad_argument_naming_it(kwargs, names, tmp_path):
    if kwargs.get("log_dir") == "FILE":
        f = tmp_path / "not_a_folder.jsonl"
        f.write_text("")
        kwargs = {"log_dir": f}
    model = Tagger()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises((TypeError, ValueError), match=names):
            w = lstmwatch.watch(model, **kwargs)
            train(model, batches(3), loss_of, watcher=w)  # a late failure is no refusal: it must not come
            w.close()


def _steps_with_bad_ones(bad_step, steps: int = 3, bad: tuple[int, ...] = (2,)):
    """`steps` steps; those in `bad` call bad_step(watcher, loss), which may refuse with TypeError/ValueError.
    Parameters are compared with an unwatched run; returns (watcher, the refusals caught, the warnings)."""
    data = batches(steps)
    torch.manual_seed(SEED)
    plain = Tagger()
    torch.manual_seed(SEED)
    model = Tagger()
    train(plain, data, loss_of)
    refused = []

    def step(w, i, loss):
        if i not in bad:
            return w.step(loss)
        try:
            return bad_step(w, loss)
        except (TypeError, ValueError) as exc:
            refused.append(exc)
        return None

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        w = lstmwatch.watch(model, log_every=1)
        train(model, data, loss_of, watcher=w, step=step)
        w.close()
    assert_params_equal(plain, model)
    return w, refused, log


@pytest.mark.parametrize(("bad", "name"), [
    (lambda w, loss: w.step("1.5"), "loss"),
    (lambda w, loss: w.step(loss, val_loss="low"), "val_loss"),
    (lambda w, loss: w.step(loss, val_loss=[0.5]), "val_loss"),
], ids=["step('1.5')", "val_loss='low'", "val_loss=[0.5]"])
def test_step_refuses_a_bad_argument_and_still_counts_the_step(bad, name):
    w, refused, _ = _steps_with_bad_ones(bad)
    assert refused, "the bad argument was accepted"
    assert name in str(refused[0]), f"the error does not name {name!r}: {refused[0]!r}"
    assert w.step_count == 3, f"step_count {w.step_count} after 3 step() calls"
    assert [r.step for r in w.records] == [1, 2, 3], "the refused step lost its record"


def test_step_with_a_per_sample_loss_is_refused_or_reduced_once():
    # a (B,) loss, as reduction='none' gives
    w, refused, log = _steps_with_bad_ones(lambda w, loss: w.step(loss.detach() * torch.ones(B)), 5, (2, 4))
    assert w.step_count == 5
    assert [r.step for r in w.records] == [1, 2, 3, 4, 5]
    if refused:
        assert all("scalar" in str(e) for e in refused), [str(e) for e in refused]
    else:
        notes = [x for x in log if issubclass(x.category, lstmwatch.LSTMWatchWarning) and "scalar" in str(x.message)]
        assert len(notes) == 1, f"a non-scalar loss reduced silently or noted {len(notes)} times"


def test_misspelt_detector_option_lists_the_valid_ones():
    with pytest.raises((TypeError, ValueError)) as info:
        lstmwatch.watch(Tagger(), detectors={"stalled_loss": {"patiense": 5}})
    assert "patience" in str(info.value), f"the valid options are not listed: {info.value}"


# ======================================================================================================
# 3. It does not flood
# ======================================================================================================

# 10,000 steps at log_every=1 take ~34 s on one core of the reference machine (3.4 ms a step, nearly all of it
# lstmwatch's logging step), ~70 s for both flood tests: 3,000 by default keeps this file well under a minute.
FLOOD_STEPS = int(os.environ.get("LSTMWATCH_FLOOD_STEPS", "3000"))


def _flood(fault_on):
    """A hidden-4 LSTM, T 5, batch 4, log_every=1, FLOOD_STEPS steps; inputs *1000 while fault_on(step)."""
    torch.manual_seed(SEED)
    lstm, head = nn.LSTM(3, 4), nn.Linear(4, 1)
    opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.01)
    xs = torch.randn(64, 5, 4, 3)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        w = lstmwatch.watch(lstm, log_every=1)
        for s in range(1, FLOOD_STEPS + 1):
            x = xs[s % 64] * (1000.0 if fault_on(s) else 1.0)
            out, _ = lstm(x)
            loss = head(out[-1]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
        w.close()
    ours = [x for x in log if issubclass(x.category, lstmwatch.LSTMWatchWarning)]
    per = Counter((x.category.__name__, getattr(getattr(x.message, "event", None), "module", "")) for x in ours)
    return ours, per


def test_a_persistent_fault_prints_at_most_10_warnings():
    ours, per = _flood(lambda s: True)
    assert len(ours) <= 10, f"{len(ours)} warnings in {FLOOD_STEPS} steps: {dict(per)}"


def test_an_on_off_fault_prints_a_few_warnings_per_kind_and_module():
    # Ten fault periods whatever the length: on for FLOOD_STEPS // 20 steps, off as long (500 at 10,000 steps).
    period = max(1, FLOOD_STEPS // 20)
    ours, per = _flood(lambda s: ((s - 1) // period) % 2 == 0)
    assert max(per.values(), default=0) <= 3, f"{len(ours)} warnings in {FLOOD_STEPS} steps: {dict(per)}"


class Chatty:
    """A user's detector (the documented protocol: kind, update(record) -> events): at step 1 the root cause
    (unnormalized input), then 30 consequences (gate saturation) on every record."""

    kind = "chatty"

    def update(self, record):
        events = []
        if record.step == 1:
            events.append(lstmwatch.Event(1, "unnormalized_input", "warning", "rnn", "inputs around 1e3", "normalize"))
        events += [lstmwatch.Event(record.step, "gate_saturation", "warning", "rnn", f"saturated #{k}", "see above")
                   for k in range(30)]
        return events


def test_events_keep_the_first_of_each_kind_beyond_their_bound():
    pair = compare(Tagger, batches(40), loss_of, log_every=1, console=False, detectors=[Chatty()], close=False)
    w = pair.watcher
    try:
        kinds = Counter(e.kind for e in w.events)
        assert kinds["unnormalized_input"] == 1, f"the first root cause was dropped from watcher.events: {kinds}"
        assert min(e.step for e in w.events if e.kind == "gate_saturation") == 1, "the first saturation was dropped"
        first_root = next(line for line in w.summary().splitlines() if line.startswith("1. "))
        assert "unnormalized_input" in first_root, f"the live summary names another root cause: {first_root}"
    finally:
        w.close()


# ======================================================================================================
# 4. It leaves no mark
# ======================================================================================================


@pytest.mark.parametrize("when", ["after_step", "mid_step"])
def test_deepcopy_of_a_watched_model_carries_nothing_of_lstmwatch(when):
    model = Tagger()
    reference = copy.deepcopy(model)
    assert stray_tensors(reference) == [], "the checker itself is wrong"
    data = batches(2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_every=1) as w:
            train(model, data[:1], loss_of, watcher=w)
            if when == "mid_step":  # forward and backward of a logging step done, step() not yet called
                model(data[1]).backward()
            clone = copy.deepcopy(model)
            if when == "mid_step":
                w.step()
    assert forward_hook_count(clone) == 0, f"{forward_hook_count(clone)} forward hook(s) copied"
    assert grad_hook_count(clone) == 0, f"{grad_hook_count(clone)} post-accumulate-grad hook(s) copied"
    stray = stray_tensors(clone)
    assert not stray, f"the copy holds {len(stray)} tensor(s) that are not its parameters or buffers: {stray[:8]}"


def test_torch_save_of_a_watched_model_loads_without_lstmwatch(tmp_path):
    model = nn.ModuleDict({"rnn": nn.LSTM(F, H), "head": nn.Linear(H, 1)})

    def forward(m, x):
        out, _ = m["rnn"](x)
        return mean_loss(m["head"](out).transpose(0, 1).flatten(1))

    path = tmp_path / "model.pt"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_every=1) as w:
            train(model, batches(2), forward, watcher=w)
            torch.save(model, path)  # whole-module pickling, while watched
    code = textwrap.dedent(f"""
        import sys
        sys.modules["lstmwatch"] = None  # lstmwatch cannot be imported here
        import torch
        m = torch.load({str(path)!r}, weights_only=False)
        out, _ = m["rnn"](torch.randn(5, 2, {F}))
        hooks = sum(len(x._forward_hooks) for x in m.modules())
        print("LOADED", hooks)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED 0" in proc.stdout, proc.stdout


def _user_note():
    warnings.warn("once", UserWarning, stacklevel=1)  # one fixed line: the 'default' action prints it once


def _note_count(watched, layers):
    model = Tagger(nn.LSTM(F, H, num_layers=layers))
    data = batches(6)
    with warnings.catch_warnings(record=True) as log:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        globals().pop("__warningregistry__", None)
        w = lstmwatch.watch(model, log_every=1, console=False) if watched else None

        def step(wt, i, loss):
            _user_note()
            wt.step(loss)

        if watched:
            train(model, data, loss_of, watcher=w, step=step)
            w.close()
        else:
            for x in data:
                model(x).backward()
                _user_note()
    return sum(1 for x in log if str(x.message) == "once")


@pytest.mark.parametrize("layers", [1, 2])  # 2: a lower layer's hidden states are recomputed with the fused op
def test_the_warnings_registry_is_untouched(layers):
    assert _note_count(False, layers) == 1, "the check itself is wrong: unwatched, the note prints once"
    n = _note_count(True, layers)
    assert n == 1, f"the user's 'default' warning printed {n} times: lstmwatch reset the warnings registry"


def test_step_1_does_not_keep_the_loops_locals_alive():
    model = Tagger()
    data = batches(3)
    refs = []

    def loop(w):
        torch.manual_seed(SEED + 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for i, x in enumerate(data, 1):
            raw = x.clone()  # a tensor only the loop holds
            loss = model(raw)
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
            if i == 1:
                refs.append(weakref.ref(raw))
            del raw
        gc.collect()
        return refs[0]() is None  # the loop's frame is still alive here

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with lstmwatch.watch(model, log_every=1) as w:
            dead = loop(w)
    assert dead, "a tensor the loop deleted after step 1 is still alive: lstmwatch holds the loop's locals"


def test_two_watchers_in_two_threads():
    results, errors = {}, []

    def run(k):
        try:
            # The global RNG is shared by the threads: the twin is a copy, not a second draw.
            torch.manual_seed(SEED + k)
            plain = Tagger()
            model = copy.deepcopy(plain)
            data = batches(12, seed=SEED + k)
            train(plain, data, loss_of)
            w = lstmwatch.watch(model, log_every=1, console=False)
            train(model, data, loss_of, watcher=w)
            w.close()
            assert_params_equal(plain, model)
            results[k] = w
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((k, repr(exc)))

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for k in (1, 2):
        assert_watched_after(results[k])


# ======================================================================================================
# 5. It says what it cannot see
# ======================================================================================================


def test_close_says_step_was_never_called():
    model = Tagger()
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        w = lstmwatch.watch(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x in batches(120):
            model(x).backward()
            opt.step()
            opt.zero_grad()
        w.close()
    said = [str(x.message) for x in log if issubclass(x.category, lstmwatch.LSTMWatchWarning)]
    hits = [m for m in said if "step(" in m and ("never" in m or "not called" in m)]
    assert len(hits) == 1, f"at close(), lstmwatch said: {said}"


@pytest.fixture(scope="module")
def header_line(tmp_path_factory):
    """A real run log's header line."""
    folder = tmp_path_factory.mktemp("runlog")
    model = Tagger()
    with lstmwatch.watch(model, log_dir=folder, log_every=1, console=False) as w:
        train(model, batches(1), loss_of, watcher=w)
        path = w.log_path
    with open(path, "rb") as f:
        return f.readline()


def _hostile_log(path, header, stats_value):
    with open(path, "wb") as f:
        f.write(header)
        f.write(b'{"type":"record","step":1,"loss":1.0,"val_loss":null,"stats":{"a":' + stats_value
                + b'},"curves":{}}\n')
        f.write(b'{"type":"end","steps":1}\n')


@pytest.mark.parametrize("value", ["deep_nesting", "5000_digits"])
def test_load_refuses_a_hostile_log_naming_file_and_line(value, header_line, tmp_path):
    path = tmp_path / "hostile.jsonl"
    depth = 100_000
    stats_value = b"[" * depth + b"]" * depth if value == "deep_nesting" else b"7" * 5000
    _hostile_log(path, header_line, stats_value)
    with pytest.raises(ValueError) as info:
        lstmwatch.load(path)
    msg = str(info.value)
    assert str(path) in msg and "line 2" in msg, f"{type(info.value).__name__}: {msg[:300]}"


_LOAD_BOUNDED = """
import json, resource, sys
import lstmwatch
def vm_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
# At most 2 GiB more address space than lstmwatch and torch take: a runaway load fails here, not the machine.
limit = (vm_kb() + 2 * 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    lstmwatch.load(sys.argv[1])
    got = {"error": None}
except BaseException as exc:
    got = {"error": type(exc).__name__, "is_value_error": isinstance(exc, ValueError), "len": len(str(exc)),
           "message": str(exc)[:300]}
got["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(got))
"""


def test_load_of_a_200mb_line_is_refused_with_bounded_memory(header_line, tmp_path):
    path = tmp_path / "huge.jsonl"
    # One stats value of 200 MB: a list of 100 million numbers (a 200 MB string is refused in ~260 MB, but
    # with the whole string in the message).
    _hostile_log(path, header_line, b"[" + b"0," * (100 * 1024 * 1024 - 1) + b"0]")
    proc = subprocess.run([sys.executable, "-c", _LOAD_BOUNDED, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    if not (got["error"] and got["is_value_error"]):
        problems.append(f"no ValueError: {got['error']}")
    if got["error"] and not (str(path) in got["message"] and "line 2" in got["message"]):
        problems.append(f"the error names neither file nor line: {got['message'][:200]!r}")
    if got["error"] and got["len"] >= 2000:
        problems.append(f"a {got['len']:,}-character error message")
    if got["growth_mb"] >= 400:
        problems.append(f"memory grew by {got['growth_mb']:.0f} MB reading the log")
    assert not problems, "; ".join(problems)


def test_scaler_search_keeps_an_exec_namespace_whole():
    # A training loop run by exec() with its own locals dict (as some runners do): that dict is the namespace
    # itself, not a copy, and must come out of the scaler search untouched.
    model = Tagger()
    ns = {"model": model, "lstmwatch": lstmwatch, "torch": torch, "x": batches(1)[0], "kept": 42}
    code = ("w = lstmwatch.watch(model, console=False)\n"
            "loss = model(x).pow(2).mean()\n"
            "loss.backward()\n"
            "w.step(loss)\n"
            "w.close()\n")
    exec(code, {"__builtins__": __builtins__}, ns)
    assert ns["kept"] == 42 and "w" in ns and "loss" in ns
