"""A long run at log_every=1 with an input fault: how many warnings lstmwatch prints, and whether memory grows.

    python benchmarks/flood.py [--steps 100000] [--fault persistent|on-off] [--period 500] [--threads 1]

A tiny LSTM (hidden 4, T 5, batch 4, SGD lr 0.01) trained for --steps steps at log_every=1, its inputs x1000
(unnormalized) on every step, or on and off every --period steps. Prints the steps, the warnings by kind and
module, the wall time and the resident memory (RSS) after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from collections import Counter

import torch
from torch import nn

import lstmwatch


def rss_mib() -> float:
    """The resident memory of this process now (Linux: /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--fault", choices=("persistent", "on-off"), default="persistent")
    ap.add_argument("--period", type=int, default=500, help="with --fault on-off: steps on, then as many off")
    ap.add_argument("--warmup", type=int, default=2_000, help="steps before the first RSS reading")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lstm, head = nn.LSTM(3, 4), nn.Linear(4, 1)
    opt = torch.optim.SGD([*lstm.parameters(), *head.parameters()], lr=0.01)
    xs = torch.randn(64, 5, 4, 3)  # (batches, T, batch, features)

    def faulty(s: int) -> bool:
        return args.fault == "persistent" or ((s - 1) // args.period) % 2 == 0

    readings: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with lstmwatch.watch(lstm, log_every=1) as w:
            for s in range(1, args.steps + 1):
                scale = 1000.0 if faulty(s) else 1.0
                loss = head(lstm(xs[s % len(xs)] * scale)[0][-1]).pow(2).mean()  # the head reads the last step
                loss.backward()
                opt.step()
                opt.zero_grad()
                w.step(loss)
                if s == min(args.warmup, args.steps) or (s > args.warmup and s % max(args.steps // 10, 1) == 0):
                    readings.append((s, rss_mib()))
                    print(f"  step {s}: {time.perf_counter() - t0:.0f}s, RSS {readings[-1][1]:.1f} MiB, "
                          f"{len(w.events)} events", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    ours = [x for x in log if issubclass(x.category, lstmwatch.LSTMWatchWarning)]
    by_kind = Counter(x.category.__name__ for x in ours)
    per = Counter((x.category.__name__, getattr(getattr(x.message, "event", None), "module", "")) for x in ours)
    print(f"steps: {args.steps} at log_every=1, fault: {args.fault}"
          + (f" (period {args.period})" if args.fault == "on-off" else ""))
    print(f"warnings: {len(ours)}  " + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()))
    print("  at steps: " + ", ".join(f"{e.kind}@{e.step}" for e in w.events if e.severity != "info"))
    print(f"most per kind and module: {max(per.values(), default=0)}")
    print(f"wall time: {wall:.0f} s ({1e3 * wall / args.steps:.2f} ms a step)")
    (s0, r0), (s1, r1) = readings[0], readings[-1]
    print(f"RSS: {r0:.1f} MiB at step {s0}, {r1:.1f} MiB at step {s1}: growth after warm-up {r1 - r0:+.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
