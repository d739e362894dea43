"""lstmwatch's cost per training step against its peers', every variant measured in one process.

    python benchmarks/peers.py              # the reference table (~5 minutes on 2 cores)
    python benchmarks/peers.py --quick      # the same, trimmed (~1 minute)
    python benchmarks/peers.py --device cuda

Reference workload (as benchmarks/overhead.py): nn.LSTM(32, 256, num_layers=2, batch_first=True), a linear head on
the last step, batch 64, T=100, Adam, 2 CPU threads. Every row trains its own copy of one model on the same batch;
the copies run in blocks of --block steps, interleaved, the order reversed every round, so drifts of the machine
fall on all alike. Rows: plain, a second plain copy (the method's noise floor), lstmwatch (default; every step;
every step on 2 sampled rows), wandb.watch (default; log="all" every step, in an offline run, wandb.log each step
as a user's loop does), torch.autograd.detect_anomaly() around forward and backward, and torchmortem's Autopsy
attached as its README says.

Columns: `ratio` is the trimmed mean (10% off each end, at least one block each from 5 blocks on) of the paired
per-block ratios, the row's block over plain's block of the same round; `IQR` and `min-max` their spread over
blocks; `sum ratio` the row's total time over plain's, which weighs a periodic heavy step (lstmwatch's logging
step) at its true share where the trimmed mean may drop the one block holding it; `ms/step` the row's mean step.
The lstmwatch rows start their schedule at step 51, past the dense start (1, 2, 4, ..., 32), so the window holds
logging steps at a long run's density (one in 50). Last line: `peers: ...`, the ratios for a README to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead as oh  # noqa: E402  (the workload, Variant and interleave are overhead.py's own)

Data = tuple[torch.Tensor, torch.Tensor]  # one batch (x, y), the same for every copy
LOG_EVERY = oh.LOG_EVERY
WARMUP = 2  # steps per copy before the window: allocator and first-call costs, lstmwatch's step-1 log


@dataclass
class Peer:
    """One row: a label for the summary, a label for the table, what the tool records, and its model copy."""

    key: str
    name: str
    records: str
    variant: oh.Variant | None = None
    reason: str = ""  # why the row has no number (not installed, failed to attach or to step)
    finish: Callable[[], str] | None = None  # run after the window, outside the timing; returns a note or ""


@dataclass
class Row:
    """A peer's numbers against plain."""

    peer: Peer
    ratio: float = math.nan
    q1: float = math.nan
    q3: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    sum_ratio: float = math.nan
    ms: float = math.nan
    blocks: list[float] = field(default_factory=list)


def trimmed_mean(xs: list[float], frac: float = 0.1) -> float:
    """Mean of xs without the `frac` lowest and highest (at least one each once there are 5 values)."""
    s = sorted(xs)
    k = max(1, int(len(s) * frac)) if len(s) >= 5 else 0
    return statistics.fmean(s[k:len(s) - k])


def quartiles(xs: list[float]) -> tuple[float, float]:
    """First and third quartiles (both the value itself for a single value)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


# --- the peers


def lstmwatch_peers(base: torch.nn.Module, data: Data) -> list[Peer]:
    """lstmwatch with its defaults (console off), and with everything every step on 8 rows and on 2."""
    return [
        Peer("lstmwatch default", "lstmwatch default (`log_every=50`)",
             "NaN/Inf sums each step; every 50th: gates, saturation, grad through time, per-gate norms (8 rows)",
             oh.Variant("lstmwatch default", base, data, attach=oh.lstmwatch_attach())),
        Peer("every step", "lstmwatch every step (`log_every=1`)",
             "gates, saturation, grad through time, per-gate norms every step (8 sampled rows)",
             oh.Variant("lstmwatch every step", base, data, attach=oh.lstmwatch_attach(log_every=1))),
        Peer("every step sample=2", "lstmwatch every step on 2 rows (`log_every=1, sample=2`)",
             "the same every step, from 2 sampled rows: the cost of `sample`",
             oh.Variant("lstmwatch every step, sample 2", base, data,
                        attach=oh.lstmwatch_attach(log_every=1, sample=2))),
    ]


def wandb_peers(base: torch.nn.Module, data: Data, tmp: str, stack: contextlib.ExitStack) -> list[Peer]:
    """wandb.watch(model) and wandb.watch(model, log="all", log_freq=1) in one offline run; wandb.log each step."""
    peers = [Peer("wandb.watch", "`wandb.watch(model)` (gradients, `log_freq=1000`)",
                  "a hook per parameter gradient; histograms every 1000th step (none in the window); loss"),
             Peer("wandb.watch all", "`wandb.watch(model, log=\"all\", log_freq=1)`",
                  "64-bin histograms of every parameter and its gradient every step; loss")]
    try:
        import wandb
    except ImportError:
        for p in peers:
            p.reason = "not installed"
        return peers
    os.environ["WANDB_MODE"] = "offline"  # never the network, whatever the caller's environment says
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        # console="off": wandb would otherwise capture this process's stdout, a cost no row should carry.
        run = wandb.init(mode="offline", dir=tmp, project="lstmwatch-peers",
                         settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:  # any failure to start becomes the rows' reason
        for p in peers:
            p.reason = f"wandb.init failed: {type(e).__name__}: {e}"
        return peers
    stack.callback(run.finish)

    def log_loss(loss: torch.Tensor) -> None:
        # wandb.watch only fills the row; the user's wandb.log commits it, so a real loop pays both.
        run.log({"loss": loss.item()})

    for p, kw in zip(peers, ({}, {"log": "all", "log_freq": 1})):
        try:
            p.variant = oh.Variant(p.key, base, data, after=log_loss)
            run.watch(p.variant.model, **kw)
        except Exception as e:
            p.variant, p.reason = None, f"wandb.watch failed: {type(e).__name__}: {e}"
    return peers


def anomaly_peer(base: torch.nn.Module, data: Data) -> Peer:
    """torch.autograd.detect_anomaly() around forward and backward."""
    return Peer("detect_anomaly", "`torch.autograd.detect_anomaly()`",
                "a traceback kept per autograd node; every backward output checked for NaN",
                oh.Variant("detect_anomaly", base, data,
                           wrap=lambda: torch.autograd.detect_anomaly(check_nan=True)))


def torchmortem_peer(base: torch.nn.Module, data: Data, stack: contextlib.ExitStack) -> Peer:
    """torchmortem's Autopsy, attached as its README's Quick Start does: step(loss=loss.item()) after opt.step()."""
    peer = Peer("torchmortem", "torchmortem `Autopsy(model, optimizer=opt)`",
                "loss; norm/mean/max/zero-frac of the grad at the LSTM's and head's outputs; the head's output "
                "and weight stats; nothing inside the LSTM; ~15 .item() calls")
    try:
        from torchmortem import Autopsy
    except ImportError:
        peer.reason = "not installed"
        return peer
    v = oh.Variant("torchmortem", base, data)
    try:
        autopsy = Autopsy(v.model, optimizer=v.opt)  # sampling="balanced", its default
        autopsy.attach()  # the explicit form of `with Autopsy(...) as autopsy:` in its docstring
    except Exception as e:
        peer.reason = f"Autopsy failed to attach: {type(e).__name__}: {e}"
        return peer
    # detach() runs its analysis: once, after the window; the callback also covers a failure mid-run, so its
    # atexit handler never writes autopsy_crash_report.html into the working directory.
    stack.callback(autopsy.detach)
    v.after = lambda loss: autopsy.step(loss=loss.item())
    peer.variant = v

    def finish() -> str:
        autopsy.detach()
        return "torchmortem recorded: " + torchmortem_summary(autopsy)

    peer.finish = finish
    return peer


def torchmortem_summary(autopsy: Any) -> str:
    """What each of an Autopsy's collectors recorded, and for which modules it found no data."""
    parts = []
    for c in autopsy._collectors:  # no public accessor; read after detach(), outside the timing
        s = c.state()
        n = len(s.steps)
        desc = f"{s.name} {n} steps"
        if s.layers:
            desc += " x (" + ", ".join(s.layers) + ")"
            # A hook that skips a module (a tuple output, a (64, 1) output for SVD) leaves zeros in every series.
            empty = [name for i, name in enumerate(s.layers)
                     if all(a.ndim == 2 and a.shape[0] and not a[:, i].any() for a in s.series.values())]
            if empty and n:
                desc += f", nothing for {', '.join(empty)}"
        parts.append(desc)
    report = autopsy.get_report()
    findings = len(report.findings) if report is not None else 0
    return "; ".join(parts) + f"; {findings} findings"


# --- the measurement


def measure(peers: list[Peer], steps: int, block: int, from_step: int) -> list[Row]:
    """Warm every copy up, start lstmwatch's schedules at `from_step`, interleave blocks; rows against plain."""
    live = [p for p in peers if p.variant is not None]
    for p in live:
        try:
            for _ in range(WARMUP):
                p.variant.step(record=False)
        except Exception as e:  # a tool that cannot step this workload gets a reason, not a number
            p.reason = f"failed to step: {type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                p.variant.close()
            p.variant = None
    live = [p for p in live if p.variant is not None]
    for p in live:
        if p.variant.watcher is not None:
            p.variant.skip_to(from_step)
    rounds = max(1, steps // block)
    res = oh.interleave([p.variant for p in live], rounds, block)
    plain = [w for w, _ in res[0]]
    rows = []
    by_peer = {id(p): r for p, r in zip(live, res)}
    for p in peers:
        if id(p) not in by_peer:
            rows.append(Row(p))
            continue
        wall = [w for w, _ in by_peer[id(p)]]
        per = [w / b for w, b in zip(wall, plain)]
        q1, q3 = quartiles(per)
        rows.append(Row(p, trimmed_mean(per), q1, q3, min(per), max(per), sum(wall) / sum(plain),
                        1e3 * sum(wall) / len(p.variant.wall), per))
    return rows


def helpers_cpu() -> float | None:
    """CPU seconds used so far by this process's live descendants (wandb-core and its monitor), Linux only."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        procs = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            except OSError:
                continue
            procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    except (OSError, ValueError, AttributeError):
        return None
    mine, total, grew = {os.getpid()}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                total += procs[pid][1]
                grew = True
    return total


# --- output


def fmt(x: float, spec: str = ".3f") -> str:
    """A number, or a dash for none."""
    return "-" if math.isnan(x) else format(x, spec)


def table(rows: list[Row]) -> str:
    """The markdown table of the rows."""
    lines = ["| variant | ratio | IQR | min-max | sum ratio | ms/step | records per step |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.peer.reason:
            lines.append(f"| {r.peer.name} | {r.peer.reason} | | | | | {r.peer.records} |")
            continue
        lines.append(f"| {r.peer.name} | {fmt(r.ratio)} | {fmt(r.q1)}-{fmt(r.q3)} | {fmt(r.lo)}-{fmt(r.hi)} | "
                     f"{fmt(r.sum_ratio)} | {fmt(r.ms, '.1f')} | {r.peer.records} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The one line a README quotes: plain, then each row's trimmed-mean ratio."""
    plain = rows[0]
    parts = [f"plain 1.000 ({plain.ms:.0f} ms)"]
    for r in rows[1:]:
        if r.peer.reason:
            parts.append(f"{r.peer.key} n/a ({r.peer.reason.split(':')[0]})")
        else:
            parts.append(f"{r.peer.key} {r.ratio:.2f}x")
    return "peers: " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run every peer on the reference workload and print the table and the summary line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a fast pass (~1 minute): 30 steps in blocks of 5")
    ap.add_argument("--steps", type=int, help="steps per variant in the window (default 150, quick 30)")
    ap.add_argument("--block", type=int, help="steps per interleaved block (default 10, quick 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models train")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    oh.DEVICE = device  # overhead.make_data, Variant and device_sync read it
    steps = args.steps or (30 if args.quick else 150)
    block = args.block or (5 if args.quick else 10)
    if steps < block:
        ap.error(f"--steps {steps} is shorter than one block of {block}")
    # A long window starts past the dense start and holds one logging step per 50; a short one is centred on
    # step 100 so it holds exactly one (a higher density than a long run's: the quick figure reads high).
    from_step = LOG_EVERY + 1 if steps >= LOG_EVERY else 2 * LOG_EVERY - steps // 2

    cfg = oh.Config()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"# lstmwatch and its peers\n\ntorch {torch.__version__}, {where}, {cfg.label()}, Adam; "
          f"{steps} steps per variant in blocks of {block}, interleaved; at start: {oh.load_note()}\n", flush=True)
    t0 = time.perf_counter()
    other = oh.OtherLoad()
    base = oh.Net(cfg.inp, cfg.hidden, cfg.layers)
    data = oh.make_data(cfg)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack, warnings.catch_warnings():
        # detect_anomaly warns on every entry, torchmortem's full backward hook on every backward (no input
        # requires grad): printing them would be a cost of this script, not of the tools.
        warnings.simplefilter("ignore")
        peers = [Peer("plain", "plain", "nothing", oh.Variant("plain", base, data)),
                 Peer("noise", "plain copy (noise floor)", "nothing", oh.Variant("plain copy", base, data)),
                 *lstmwatch_peers(base, data),
                 *wandb_peers(base, data, tmp, stack),
                 anomaly_peer(base, data),
                 torchmortem_peer(base, data, stack)]
        h0, w0 = helpers_cpu(), time.perf_counter()
        try:
            rows = measure(peers, steps, block, from_step)
            h1, window = helpers_cpu(), time.perf_counter() - w0
        finally:
            for p in peers:
                if p.variant is not None:
                    p.variant.close()
        for p in peers:
            if p.finish is not None and not p.reason:
                notes.append(p.finish())

    print(table(rows))
    print()
    lw = next(r for r in rows if r.peer.key == "lstmwatch default")
    if not lw.peer.reason:
        n_log, n = sum(lw.peer.variant.logging), len(lw.peer.variant.logging)
        print(f"lstmwatch default: {n_log} logging step{'s' * (n_log != 1)} in its window of {n} "
              f"(steps {from_step}-{from_step + n - 1}; a long run: 1 in {LOG_EVERY}).")
    wb, wb_all = (next(r for r in rows if r.peer.key == k) for k in ("wandb.watch", "wandb.watch all"))
    if not wb.peer.reason and not wb_all.peer.reason:
        # A gradient-histogram step costs at most what log="all" adds per step (it also does the parameters).
        bound = max(0.0, wb_all.ms - wb.ms) / 1000 / rows[0].ms
        at_most = "less than 0.001" if bound < 1e-3 else f"at most {bound:.3f}"
        print(f"wandb.watch default: its histogram step (every 1000th) is outside the window; spread over 1000 "
              f"steps it adds {at_most} to the ratio.")
    if h0 is not None and h1 is not None and h1 - h0 > 0:
        # wandb ships histograms to its own process: that work is outside this process's clock, and on a
        # machine with as many cores as threads it slows whichever row runs alongside, wandb's or another's.
        print(f"wandb's helper processes (wandb-core, its system monitor) used {h1 - h0:.1f} CPU s in the "
              f"{window:.0f} s window ({(h1 - h0) / window:.2f} cores), outside every row's own clock.")
    for note in notes:
        print(note)
    busy = other.cores()
    load = "" if busy is None else f"; other programs kept {busy:.2f} of {os.cpu_count()} cores busy meanwhile"
    if busy is not None and busy > 0.1:
        load += ": timings are noisy, take them as provisional"
    print(f"({time.perf_counter() - t0:.0f} s; at end: {oh.load_note()}{load})\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
