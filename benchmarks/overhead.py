"""What lstmwatch costs a training step, against plain PyTorch, wandb.watch and detect_anomaly.

    python benchmarks/overhead.py --quick     # ~1 minute: every section, trimmed
    python benchmarks/overhead.py             # reference, side by side, logging step vs batch, profile (~5 min)
    python benchmarks/overhead.py --grid      # + how the cost grows with hidden size, length, layers, batch (+3 min)
    python benchmarks/overhead.py --only reference --aa   # the reference, and plain against plain: the noise floor
    python benchmarks/overhead.py --device cuda   # the same on a GPU: cuDNN's LSTM, each step timed to a synchronize
    python benchmarks/overhead.py --only cell     # nn.LSTMCell(32, 256) stepped by hand over T=100, and its profile
    python benchmarks/overhead.py --only sample,floor   # a logging step by sample size; its unavoidable matmuls alone

Reference workload: nn.LSTM(32, 256, num_layers=2, batch_first=True), a linear head on the last step,
batch 64, 100 timesteps, Adam, 2 CPU threads. Every variant is a copy of one model with identical weights,
trained in one process on the same batch, watcher.step(loss) after opt.step(). Variants run in blocks of
--block steps, interleaved, the order reversed every round, so drifts of the machine fall on all alike.

Columns: `ratio` is watched / plain time over the same rounds (the definition the targets use); `cpu` the same
with process CPU time; `median round` the median of each round's watched / plain block (robust to bursts of
load, blind to the rare logging step); `long run` = (median steady step + (logging step - steady step) / 50)
/ median plain step, the ratio a long run converges to, from medians.
The reference window starts at step --from-step (51) of the schedule, past the dense start (1, 2, 4, ..., 32):
its 160 steps hold the logging steps 100, 150 and 200, the density of a long run (--quick: steps 81-120, one).
`inside` columns time lstmwatch's own code (its hooks and Watcher.step) with a clock around each call: on a CPU
nothing overlaps it, so 1 + inside / plain is the direct cost, steadier than any wall-clock ratio. The last line
says how many cores other programs kept busy during the run (Linux): above 0.1, take the timings as provisional.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

import lstmwatch
from lstmwatch import probes as lw_probes
from lstmwatch import recurrence as lw_recurrence
from lstmwatch import stats as lw_stats

lw_watch = importlib.import_module("lstmwatch.watch")  # the module; lstmwatch.watch is the function

LOG_EVERY = 50  # lstmwatch's default
DEVICE = torch.device("cpu")  # --device


# --- workload


class Net(nn.Module):
    """An LSTM and a linear head on the last step."""

    def __init__(self, inp: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(inp, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])  # (B, 1)


class CellNet(nn.Module):
    """An nn.LSTMCell stepped by hand over the sequence, and a linear head on the last h (layers is ignored)."""

    def __init__(self, inp: int, hidden: int, layers: int = 1):
        super().__init__()
        self.cell = nn.LSTMCell(inp, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)  # (B, 1)


@dataclass
class Config:
    hidden: int = 256
    seq: int = 100
    layers: int = 2
    batch: int = 64
    inp: int = 32

    def label(self) -> str:
        return f"H={self.hidden} T={self.seq} L={self.layers} B={self.batch}"

    def but(self, **kw) -> Config:
        return Config(**{**self.__dict__, **kw})


def make_data(cfg: Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(cfg.batch, cfg.seq, cfg.inp, generator=g), torch.randn(cfg.batch, 1, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def device_sync() -> None:
    """Wait for the device, so a step's wall time is its own (the benchmark's sync, not lstmwatch's)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Variant:
    """A model copy, its optimizer and what runs around its step; step() returns (wall s, cpu s)."""

    def __init__(self, name: str, base: nn.Module, data, attach=None, wrap=None, after=None):
        self.name = name
        self.model = copy.deepcopy(base).to(DEVICE)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x, self.y = data
        self.watcher = attach(self.model) if attach else None
        self.wrap = wrap  # a context manager factory around forward and backward
        self.after = after  # called with the loss after opt.step() (another tool's per-step call)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.logging: list[bool] = []  # whether each step was an lstmwatch logging step
        self.inside = Inside(self.watcher) if self.watcher is not None else None
        self.inside_steps: list[float] = []

    def step(self, record: bool = True) -> tuple[float, float]:
        w = self.watcher
        logging = bool(w is not None and w.clock.logging)
        before = self.inside.total if self.inside else 0.0
        device_sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        with self.wrap() if self.wrap else contextlib.nullcontext():
            loss = nn.functional.mse_loss(self.model(self.x), self.y)
            loss.backward()
        self.opt.step()
        if w is not None:
            w.step(loss)
        if self.after is not None:
            self.after(loss)
        device_sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.logging.append(logging)
            if self.inside:
                self.inside_steps.append(self.inside.total - before)
        return wall, cpu

    def skip_to(self, step: int) -> None:
        """Move the watcher's schedule to `step`, as if the steps before had run."""
        self.watcher.clock.seek(step)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()


def lstmwatch_attach(from_step: int = 1, **kw):
    """Attach lstmwatch (console off) with its schedule at `from_step`."""

    def attach(model):
        w = lstmwatch.watch(model, console=False, **kw)
        w.clock.seek(from_step)
        return w

    return attach


class Inside:
    """Wall time spent in one watcher's own code: its module and gradient hooks, tensor hooks, Watcher.step.

    Wraps what that watcher registered (instance attributes and hook tables), so watchers built differently
    can be timed side by side in one process.
    """

    def __init__(self, w):
        self.total = 0.0
        w.step = self._timed(w.step)
        for p in w.probes:
            for attr in ("_on_out_grad", "_on_h_grad"):  # bound when a logging step registers tensor hooks
                if hasattr(p, attr):
                    setattr(p, attr, self._timed(getattr(p, attr)))
            tables = [p.module._forward_hooks] + [q._post_accumulate_grad_hooks for q in p.module.parameters()
                                                 if q._post_accumulate_grad_hooks]
            for hooks in tables:
                for key, h in list(hooks.items()):
                    hooks[key] = self._timed(h)

    def _timed(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t0
        return timed


def interleave(variants: list[Variant], rounds: int, block: int) -> list[list[tuple[float, float]]]:
    """`rounds` rounds of `block` steps per variant, the order reversed every round; per-round (wall, cpu)."""
    out = [[] for _ in variants]
    for r in range(rounds):
        order = list(range(len(variants)))
        if r % 2:
            order.reverse()
        for i in order:
            w = c = 0.0
            for _ in range(block):
                dw, dc = variants[i].step()
                w, c = w + dw, c + dc
            out[i].append((w, c))
    return out


@dataclass
class Compare:
    name: str
    plain_ms: float
    watched_ms: float
    ratio: float  # sum / sum, wall
    cpu: float  # sum / sum, process CPU time
    median_round: float
    worst_round: float
    logging_steps: int
    steady_ratio: float  # median non-logging step / median plain step
    log_extra_ms: float  # median logging step - median plain step
    long_run: float
    inside_steady_ms: float = math.nan
    inside_log_ms: float = math.nan


def compare(plain: Variant, watched: Variant, rp, rw) -> Compare:
    """watched against plain from their interleaved rounds and per-step times."""
    pw, ww = sum(w for w, _ in rp), sum(w for w, _ in rw)
    pc, wc = sum(c for _, c in rp), sum(c for _, c in rw)
    per = [w / p for (w, _), (p, _) in zip(rw, rp)]
    n = len(watched.wall)
    p_med = statistics.median(plain.wall)
    steady = [w for w, lg in zip(watched.wall, watched.logging) if not lg]
    logs = [w for w, lg in zip(watched.wall, watched.logging) if lg]
    s_med = statistics.median(steady) if steady else p_med
    l_med = statistics.median(logs) if logs else math.nan
    if not steady:  # every step logs
        long_run = l_med / p_med
    else:
        long_run = (s_med + ((l_med - s_med) / LOG_EVERY if logs else 0.0)) / p_med
    c = Compare(watched.name, 1e3 * pw / n, 1e3 * ww / n, ww / pw, wc / max(pc, 1e-12), statistics.median(per),
                max(per), sum(watched.logging), s_med / p_med, 1e3 * (l_med - p_med), long_run)
    if watched.inside_steps:
        ins = list(zip(watched.inside_steps, watched.logging))
        st = [t for t, lg in ins if not lg]
        lg = [t for t, lg in ins if lg]
        c.inside_steady_ms = 1e3 * statistics.median(st) if st else math.nan
        c.inside_log_ms = 1e3 * statistics.median(lg) if lg else math.nan
    return c


# --- measurements


def reference(cfg: Config, steps: int, block: int, from_step: int, attach=None, aa: bool = False,
              net: type[nn.Module] = Net) -> Compare:
    """Plain against lstmwatch with default settings (or `attach`; aa: against a second plain copy), interleaved.

    net: the model class, Net (nn.LSTM) or CellNet (nn.LSTMCell stepped by hand)."""
    base = net(cfg.inp, cfg.hidden, cfg.layers)
    data = make_data(cfg)
    plain = Variant("plain", base, data)
    watched = Variant("plain copy" if aa else "lstmwatch", base, data,
                      attach=None if aa else attach or lstmwatch_attach())
    for v in (plain, watched):  # warm-up, outside the window
        v.step(record=False)
    if not aa:
        watched.skip_to(from_step)
    rounds = max(1, steps // block)
    rp, rw = interleave([plain, watched], rounds, block)
    watched.close()
    return compare(plain, watched, rp, rw)


def side_by_side(cfg: Config, steps: int, block: int, tmp: str) -> list[Compare]:
    """lstmwatch (default, every step), wandb.watch(log='all') every step and every 50, detect_anomaly."""
    base = Net(cfg.inp, cfg.hidden, cfg.layers)
    data = make_data(cfg)
    vs = [Variant("plain", base, data),
          Variant("lstmwatch default (log_every=50)", base, data, attach=lstmwatch_attach()),
          Variant("lstmwatch every step (log_every=1)", base, data, attach=lstmwatch_attach(log_every=1))]
    run = None
    try:
        import wandb
    except ImportError:
        wandb = None
        print("(wandb is not installed: its rows are left out)\n")
    if wandb is not None:
        os.environ["WANDB_MODE"] = "offline"  # never the network
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(mode="offline", dir=tmp, project="lstmwatch-overhead",
                         settings=wandb.Settings(silent=True, console="off"))

        def commit(loss):
            run.log({"loss": loss.item()})  # commits the row the hooks filled, as a wandb training loop does

        for freq in (1, LOG_EVERY):
            v = Variant(f"wandb.watch(log='all', log_freq={freq})", base, data, after=commit)
            run.watch(v.model, log="all", log_freq=freq)
            vs.append(v)
    vs.append(Variant("torch.autograd.detect_anomaly()", base, data,
                      wrap=lambda: torch.autograd.detect_anomaly(check_nan=True)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # detect_anomaly warns on every entry
            for v in vs:
                v.step(record=False)
            for v in vs[1:]:
                if v.watcher is not None:  # past the dense start; the every-step variants log every step anyway
                    v.skip_to(LOG_EVERY + 1)
            res = interleave(vs, max(1, steps // block), block)
    finally:
        if run is not None:
            run.finish()
        for v in vs:
            v.close()
    return [compare(vs[0], v, res[0], r) for v, r in zip(vs[1:], res[1:])]


def point(cfg: Config, pairs: int, sample: int = 8) -> dict:
    """Plain, a steady (non-logging) watched step and a logging step, interleaved step by step; medians."""
    base = Net(cfg.inp, cfg.hidden, cfg.layers)
    data = make_data(cfg)
    plain = Variant("plain", base, data)
    steady = Variant("steady", base, data, attach=lstmwatch_attach(sample=sample))
    logged = Variant("logging", base, data, attach=lstmwatch_attach(log_every=1, sample=sample))
    for v in (plain, steady, logged):
        v.step(record=False)
    steady.skip_to(LOG_EVERY + 1)
    for k in range(pairs):
        for v in ([plain, steady, logged] if k % 2 == 0 else [logged, steady, plain]):
            v.step()
    for v in (steady, logged):
        v.close()
    p, s, lg = (statistics.median(v.wall) for v in (plain, steady, logged))
    ins_s, ins_l = statistics.median(steady.inside_steps), statistics.median(logged.inside_steps)
    watched = s + (lg - s) / LOG_EVERY
    return {"config": cfg.label(), "batch": cfg.batch, "plain_ms": 1e3 * p, "watched_ms": 1e3 * watched,
            "ratio": watched / p, "steady_ratio": s / p, "log_extra_ms": 1e3 * (lg - p),
            "log_extra_steps": (lg - p) / p,
            "inside_steady_ms": 1e3 * ins_s, "inside_log_ms": 1e3 * ins_l,
            "inside_ratio": 1 + (ins_s + (ins_l - ins_s) / LOG_EVERY) / p}


def floor(cfg: Config, sample: int, reps: int) -> list[dict]:
    """The matrix products an exact logging step of cfg's nn.LSTM cannot do without, each timed alone on `sample`
    rows: the fused kernel for every layer below the top (whose hidden states the module's output gives), the
    gate pre-activations of every layer (two products over all S * T steps), the backward through time (T
    products of (S, 4H) by (4H, H) per layer, each waiting on the one before) and the gradient into each layer
    from the one above. Nothing else of the logging step (nonlinearities, statistics, hooks) is counted.
    """
    s, t_len, h, g = sample, cfg.seq, cfg.hidden, 4 * cfg.hidden
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (0.05 * torch.randn(*shape, generator=gen)).to(DEVICE)

    def timed(fn) -> float:
        fn()  # first-call costs out
        device_sync()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            device_sync()
            best = min(best, time.perf_counter() - t0)
        return 1e3 * best

    widths = [cfg.inp] + [h] * (cfg.layers - 1)  # each layer's input width
    rows = []
    if cfg.layers > 1:
        x0, zero = rand(s, t_len, cfg.inp), rand(1, s, h).zero_()
        lower = [[rand(g, f), rand(g, h), rand(g), rand(g)] for f in widths[:-1]]

        def kernel() -> None:
            x = x0
            with torch.no_grad():
                for flat in lower:
                    x = torch._VF.lstm(x, (zero, zero), flat, True, 1, 0.0, False, False, True)[0]
        rows.append({"part": f"hidden states of the {cfg.layers - 1} lower layer(s): the fused kernel, T steps each",
                     "ms": timed(kernel)})
    xs, hs, ws = [rand(s * t_len, f) for f in widths], rand(s * t_len, h), [rand(f, g) for f in widths]
    whh = rand(h, g)
    rows.append({"part": "gate pre-activations: (S T, F) @ (F, 4H) and (S T, H) @ (H, 4H) per layer",
                 "ms": timed(lambda: [(x @ w, hs @ whh) for x, w in zip(xs, ws)])})
    dz, dh, w_back = rand(t_len, s, g), rand(t_len, s, h), rand(g, h)
    dzs, dhs = dz.unbind(0), dh.unbind(0)

    def through_time() -> None:
        for _ in range(cfg.layers):
            for t in range(t_len - 1):
                dhs[t].addmm_(dzs[t + 1], w_back)

    rows.append({"part": f"backward through time: {cfg.layers} x {t_len - 1} products (S, 4H) @ (4H, H), in turn",
                 "ms": timed(through_time)})
    if cfg.layers > 1:
        dzf, w_in = dz.reshape(t_len * s, g), rand(g, h)
        rows.append({"part": "gradient into each lower layer: (S T, 4H) @ (4H, H)",
                     "ms": timed(lambda: [dzf @ w_in for _ in range(cfg.layers - 1)])})
    rows.append({"part": "floor: all of the above", "ms": sum(r["ms"] for r in rows)})
    return rows


GRID = {
    "hidden": [64, 128, 256, 512, 1024],
    "seq": [10, 30, 100, 300, 1000],
    "layers": [1, 2, 3, 4],
    "batch": [8, 32, 64, 128, 256, 512],
}
GRID_QUICK = {"hidden": [64, 1024], "seq": [10, 1000], "layers": [1, 4], "batch": [8, 512]}


# --- where the time goes inside lstmwatch


class HookProfile:
    """Timers around lstmwatch's functions (class-wide; install before watch()): inclusive ms, by step kind."""

    # Probe methods are wrapped in every lstmwatch.probes class that defines them.
    PROBE_METHODS = ["_hook", "_on_forward", "_capture", "_on_out_grad", "_on_h_grad", "_on_grad", "_mark",
                     "end_step", "collect", "_update_ratio", "_internals", "_recompute", "_grad_stats"]
    OTHERS = [("Watcher", "step"), ("Watcher", "_add_loss"), ("Watcher", "_log"), ("Watcher", "_call"),
              ("recurrence", "forward"), ("recurrence", "backward"), ("stats", "gate_stats"),
              ("stats", "data_stats"), ("stats", "to_host")]

    def __init__(self):
        self.acc: dict[tuple[str, bool], list[float]] = defaultdict(lambda: [0.0, 0])
        self.saved: list = []
        self.order: list[str] = []
        self.clock = None  # the watcher's clock, set after watch()

    def install(self) -> HookProfile:
        # Every probe class of the package, wherever in lstmwatch.probes it is defined.
        classes = [c for c in vars(lw_probes).values() if isinstance(c, type) and c.__module__.startswith(
            lw_probes.__name__)]
        classes = list(dict.fromkeys(b for c in classes for b in c.__mro__ if b.__module__.startswith(
            lw_probes.__name__)))
        targets = [(c, a) for a in self.PROBE_METHODS for c in classes if a in c.__dict__]
        owners = {"Watcher": lw_watch.Watcher, "recurrence": lw_recurrence, "stats": lw_stats}
        targets += [(owners[o], a) for o, a in self.OTHERS]
        for owner, attr in targets:
            orig = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
            if not callable(orig):
                continue
            key = f"{owner.__name__.split('.')[-1]}.{attr}"
            self.saved.append((owner, attr, orig))
            self.order.append(key)
            setattr(owner, attr, self._wrap(orig, key))
        return self

    def _wrap(self, fn, key):
        acc, prof = self.acc, self

        @functools.wraps(fn)
        def timed(*a, **k):
            logging = bool(prof.clock.logging) if prof.clock is not None else False
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                e = acc[(key, logging)]
                e[0] += time.perf_counter() - t0
                e[1] += 1

        return timed

    def remove(self) -> None:
        for owner, attr, orig in reversed(self.saved):
            setattr(owner, attr, orig)
        self.saved = []


def hook_profile(cfg: Config, steady_steps: int, log_steps: int,
                 net: type[nn.Module] = Net) -> tuple[list[dict], float]:
    """Inclusive ms per step in each lstmwatch function, on non-logging and on logging steps."""
    base = net(cfg.inp, cfg.hidden, cfg.layers)
    data = make_data(cfg)
    prof = HookProfile().install()
    try:
        v = Variant("lstmwatch", base, data, attach=lstmwatch_attach())
        prof.clock = v.watcher.clock
        p = Variant("plain", base, data)
        p.step(record=False)
        v.step(record=False)
        v.skip_to(LOG_EVERY + 1)
        prof.acc.clear()
        for k in range(steady_steps + log_steps):
            v.watcher.clock.logging = k >= steady_steps
            v.step()
            p.step()
        v.close()
    finally:
        prof.remove()
    rows = []
    for k in prof.order:
        (t0, c0), (t1, c1) = prof.acc.get((k, False), (0.0, 0)), prof.acc.get((k, True), (0.0, 0))
        if c0 or c1:
            rows.append({"fn": k, "steady": 1e3 * t0 / steady_steps, "steady_calls": c0 / steady_steps,
                         "steady_us": 1e6 * t0 / c0 if c0 else math.nan,
                         "log": 1e3 * t1 / log_steps, "log_calls": c1 / log_steps,
                         "log_us": 1e6 * t1 / c1 if c1 else math.nan})
    return rows, 1e3 * statistics.median(p.wall)


# --- output


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table; cols are (header, key, format), format 's' for text."""
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) if f == "s" else format(r[k], f) for _, k, f in cols) + " |")
    return "\n".join(lines)


COMPARE_COLS = [("config", "config", "s"), ("plain ms/step", "plain", ".1f"), ("watched ms/step", "watched", ".1f"),
                ("ratio", "ratio", ".3f"), ("cpu", "cpu", ".3f"), ("median round", "median", ".3f"),
                ("worst round", "worst", ".3f"), ("long run", "long", ".3f")]


def compare_row(c: Compare, config: str | None = None) -> dict:
    return {"config": config or c.name, "plain": c.plain_ms, "watched": c.watched_ms, "ratio": c.ratio, "cpu": c.cpu,
            "median": c.median_round, "worst": c.worst_round, "long": c.long_run}


def ref_inside(c: Compare) -> float:
    """The long-run ratio from the time inside lstmwatch: 1 + (steady + (logging - steady) / 50) / plain step."""
    s, lg = c.inside_steady_ms, c.inside_log_ms
    if math.isnan(lg):
        return 1 + s / c.plain_ms
    return 1 + (s + (lg - s) / LOG_EVERY) / c.plain_ms


def busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores other programs kept busy while this benchmark ran: its own CPU time taken out."""

    def __init__(self):
        self.t0, self.b0, self.c0 = time.perf_counter(), busy_seconds(), time.process_time()

    def cores(self) -> float | None:
        b1 = busy_seconds()
        if b1 is None or self.b0 is None:
            return None
        return max(0.0, (b1 - self.b0) - (time.process_time() - self.c0)) / (time.perf_counter() - self.t0)


def load_note() -> str:
    try:
        la = os.getloadavg()
    except OSError:
        return ""
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores"


def section(title: str) -> None:
    print(f"## {title}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast pass (~1 minute)")
    ap.add_argument("--grid", action="store_true", help="include the scaling grid")
    ap.add_argument("--steps", type=int, help="steps per variant in the reference window (default 160, quick 40)")
    ap.add_argument("--block", type=int, default=10, help="steps per interleaved block (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models train")
    ap.add_argument("--from-step", type=int,
                    help="schedule step the reference window starts at (default 51; quick 81, so it holds step 100)")
    ap.add_argument("--no-compare", action="store_true", help="leave out wandb.watch and detect_anomaly")
    ap.add_argument("--no-profile", action="store_true", help="leave out the per-function profile")
    ap.add_argument("--aa", action="store_true",
                    help="also run the reference protocol plain against plain: the method's noise floor")
    ap.add_argument("--only", help="comma-separated sections to run: reference,compare,batch,profile,grid,cell,"
                                   "sample,floor (cell: an nn.LSTMCell stepped by hand, plain against watched, and "
                                   "its profile; sample: a logging step by sample size; floor: the matrix products "
                                   "an exact logging step cannot do without; these three only with --only)")
    ap.add_argument("--hidden", type=int, default=256, help="reference hidden size (default 256)")
    ap.add_argument("--seq", type=int, default=100, help="reference sequence length (default 100)")
    ap.add_argument("--layers", type=int, default=2, help="reference layers (default 2)")
    ap.add_argument("--batch", type=int, default=64, help="reference batch (default 64)")
    args = ap.parse_args(argv)

    if args.only:
        only = set(args.only.split(","))
        unknown = only - {"reference", "compare", "batch", "profile", "grid", "cell", "sample", "floor"}
        if unknown:
            ap.error(f"unknown section(s) in --only: {', '.join(sorted(unknown))}")
        args.no_compare, args.no_profile = "compare" not in only, "profile" not in only
        args.grid = "grid" in only
    run = (lambda name: name in only) if args.only else (lambda name: name not in ("cell", "sample", "floor"))

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    quick = args.quick
    steps = args.steps or (40 if quick else 160)
    if args.from_step is None:
        args.from_step = 2 * LOG_EVERY - 19 if quick else LOG_EVERY + 1
    ref = Config(args.hidden, args.seq, args.layers, args.batch)
    t_start = time.perf_counter()
    start_load = load_note()
    other = OtherLoad()
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{args.threads} threads"
    print(f"# lstmwatch overhead\n\ntorch {torch.__version__}, {where}; at start: {start_load}\n")

    ref_c = None
    if run("reference"):
        section(f"Reference: default settings (log_every=50, sample=8), {ref.label()}")
        ref_c = reference(ref, steps, args.block, args.from_step)
        print(table([compare_row(ref_c, f"lstmwatch, steps {args.from_step}-{args.from_step + steps - 1} "
                                        f"({ref_c.logging_steps} logging)")], COMPARE_COLS))
        print(f"\nsteady step {ref_c.steady_ratio:.3f} x plain; a logging step costs {ref_c.log_extra_ms:.1f} ms "
              f"more than a plain step ({ref_c.log_extra_ms / (ref_c.plain_ms or 1):.2f} plain steps); inside "
              f"lstmwatch: {ref_c.inside_steady_ms:.2f} ms per steady step, {ref_c.inside_log_ms:.1f} ms per logging "
              f"step")
        verdict = "met" if ref_c.ratio <= 1.01 else ("missed (<= 1.05)" if ref_c.ratio <= 1.05 else "MISSED (> 1.05)")
        print(f"target ratio <= 1.01, never > 1.05: {verdict}\n", flush=True)
        if args.aa:
            aa = reference(ref, steps, args.block, args.from_step, aa=True)
            print(table([compare_row(aa, "plain against a plain copy (noise floor)")], COMPARE_COLS))
            print(flush=True)

    if not args.no_compare:
        cmp_steps, cmp_block = (10, 5) if quick else (max(args.block, min(steps, 60)), args.block)
        section(f"Side by side: {ref.label()}, {cmp_steps} steps each, blocks of {cmp_block} interleaved")
        with tempfile.TemporaryDirectory() as tmp:
            res = side_by_side(ref, cmp_steps, cmp_block, tmp)
        print(table([compare_row(r) for r in res], COMPARE_COLS))
        every = next((r for r in res if "log_every=1" in r.name), None)
        wb1 = next((r for r in res if "log_freq=1)" in r.name), None)
        if every and wb1:
            print(f"\nlstmwatch every step {every.ratio:.3f} against wandb.watch(log='all') every step "
                  f"{wb1.ratio:.3f}: {'below' if every.ratio < wb1.ratio else 'NOT below'}")
        print(flush=True)

    batches = [8, 64, 512] if quick else [8, 32, 64, 128, 256, 512]
    if run("batch"):
        section(f"A logging step against a plain step, by batch size ({ref.but(batch=0).label()[:-4]}, sample=8)")
        rows = [point(ref.but(batch=b), 2 if quick else 4) for b in batches]
        print(table(rows, [("batch", "batch", "d"), ("plain ms/step", "plain_ms", ".1f"),
                           ("logging step - plain, ms", "log_extra_ms", ".1f"),
                           ("in plain steps", "log_extra_steps", ".2f"),
                           ("inside lstmwatch, logging step ms", "inside_log_ms", ".1f"),
                           ("inside, steady step ms", "inside_steady_ms", ".2f")]))
        print(flush=True)

    if run("sample"):
        section(f"A logging step by sample size ({ref.but(batch=0).label()[:-4]}): the cost of `sample`")
        rows = []
        for b in sorted({8, ref.batch}):
            for sm in (1, 2, 4, 8):
                r = point(ref.but(batch=b), 2 if quick else 8, sample=sm)
                r["sample"] = sm
                r["inside_steps"] = r["inside_log_ms"] / r["plain_ms"]
                rows.append(r)
        print(table(rows, [("batch", "batch", "d"), ("sample", "sample", "d"), ("plain ms/step", "plain_ms", ".1f"),
                           ("logging step - plain, ms", "log_extra_ms", ".1f"),
                           ("in plain steps", "log_extra_steps", ".2f"),
                           ("inside lstmwatch, logging step ms", "inside_log_ms", ".1f"),
                           ("inside, in plain steps", "inside_steps", ".2f")]))
        print(flush=True)

    if run("floor"):
        section(f"The floor of an exact logging step: its unavoidable matrix products alone ({ref.label()})")
        small = point(ref.but(batch=8), 2 if quick else 4)
        for sm in (8, 1):
            rows = floor(ref, sm, 5 if quick else 20)
            print(f"sample={sm}:\n")
            print(table(rows, [("part", "part", "s"), ("ms", "ms", ".1f")]))
            total = rows[-1]["ms"]
            print(f"\nfloor {total:.1f} ms = {total / small['plain_ms']:.2f} plain steps at batch 8 "
                  f"({small['plain_ms']:.1f} ms; goal <= 0.5)\n", flush=True)

    if not args.no_profile:
        prows, p_ms = hook_profile(ref, 10 if quick else 30, 2 if quick else 5)
        section(f"Where the time goes: inclusive ms per step in lstmwatch's functions ({ref.label()}, "
                f"plain step {p_ms:.1f} ms)")
        print(table(prows, [("function", "fn", "s"), ("steady step ms", "steady", ".3f"),
                            ("calls", "steady_calls", ".0f"), ("logging step ms", "log", ".2f"),
                            ("calls ", "log_calls", ".0f")]))
        print(flush=True)

    if args.grid:
        grid = GRID_QUICK if quick else GRID
        section("How the cost grows: one factor at a time around the reference, short points")
        rows = []
        for attr, values in grid.items():
            for val in values:
                rows.append(point(ref.but(**{attr: val}), 2 if quick else 3))
                print(f"  {rows[-1]['config']}: ratio {rows[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
        print(table(rows, [("config", "config", "s"), ("plain ms/step", "plain_ms", ".1f"),
                           ("watched ms/step", "watched_ms", ".1f"), ("ratio", "ratio", ".3f"),
                           ("steady ratio", "steady_ratio", ".3f"), ("logging step extra ms", "log_extra_ms", ".1f"),
                           ("in plain steps", "log_extra_steps", ".2f"), ("inside ratio", "inside_ratio", ".4f")]))
        print("\n(watched ms/step = steady step + (logging step - steady step) / 50; inside ratio = 1 + time in "
              "lstmwatch's code per step, so averaged, / plain step)\n")

    cell_c = None
    if run("cell"):
        cell = ref.but(layers=1)
        cell_label = f"nn.LSTMCell({cell.inp}, {cell.hidden}) stepped by hand, T={cell.seq} B={cell.batch}"
        section(f"Cell: default settings (log_every=50, sample=8), {cell_label}")
        cell_c = reference(cell, steps, args.block, args.from_step, net=CellNet)
        print(table([compare_row(cell_c, f"lstmwatch, steps {args.from_step}-{args.from_step + steps - 1} "
                                         f"({cell_c.logging_steps} logging)")], COMPARE_COLS))
        print(f"\nsteady step {cell_c.steady_ratio:.3f} x plain; a logging step costs {cell_c.log_extra_ms:.1f} ms "
              f"more than a plain step ({cell_c.log_extra_ms / (cell_c.plain_ms or 1):.2f} plain steps); inside "
              f"lstmwatch: {cell_c.inside_steady_ms:.2f} ms per steady step, {cell_c.inside_log_ms:.1f} ms per "
              f"logging step")
        ins = ref_inside(cell_c)
        verdict = "met" if ins <= 1.01 else ("missed (<= 1.05)" if ins <= 1.05 else "MISSED (> 1.05)")
        print(f"target inside <= 1.01, never > 1.05: {verdict} ({ins:.3f})\n", flush=True)
        prows, p_ms = hook_profile(cell, 10 if quick else 30, 2 if quick else 5, net=CellNet)
        section(f"Where the time goes, cell: inclusive ms per step and µs per call in lstmwatch's functions "
                f"({cell_label}, plain step {p_ms:.1f} ms)")
        print(table(prows, [("function", "fn", "s"), ("steady step ms", "steady", ".3f"),
                            ("calls", "steady_calls", ".0f"), ("µs/call", "steady_us", ".1f"),
                            ("logging step ms", "log", ".2f"), ("calls ", "log_calls", ".0f"),
                            ("µs/call ", "log_us", ".1f")]))
        print(flush=True)

    busy = other.cores()
    note = "" if busy is None else f"; other programs kept {busy:.2f} of {os.cpu_count()} cores busy meanwhile"
    if busy is not None and busy > 0.1:
        note += ": timings are noisy, take them as provisional"
    print(f"({time.perf_counter() - t_start:.0f} s; at end: {load_note()}{note})")
    if ref_c is not None:
        print(f"overhead: reference ratio={ref_c.ratio:.3f} (cpu {ref_c.cpu:.3f}, median round "
              f"{ref_c.median_round:.3f}, long run {ref_c.long_run:.3f}, inside {ref_inside(ref_c):.3f})")
    if cell_c is not None:
        print(f"overhead: cell ratio={cell_c.ratio:.3f} (cpu {cell_c.cpu:.3f}, median round "
              f"{cell_c.median_round:.3f}, long run {cell_c.long_run:.3f}, inside {ref_inside(cell_c):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
