"""Score lstmwatch's detectors on seeded LSTM runs: healthy ones must stay silent, faults must be found early.

    python benchmarks/zoo.py [--seed 0] [--log-every 50] [--only NAME ...]

One row per run: expected kinds, raised kinds with their first step, verdict. Last line:
`zoo: recall=R/N false_pos=P/M`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lstmwatch.demo import scenarios


def score(sc: scenarios.Scenario, watcher) -> tuple[str, dict[str, int], int | None]:
    """Verdict, first step of each raised kind, and first step of an expected kind."""
    raised: dict[str, int] = {}
    for e in watcher.events:
        if e.severity != "info":
            raised.setdefault(e.kind, e.step)
    if not sc.expected:
        return ("ok" if not raised else "FALSE ALARM"), raised, None
    hits = [raised[k] for k in sc.expected if k in raised]
    return ("detected" if hits else "MISSED"), raised, (min(hits) if hits else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [s for s in scenarios.SCENARIOS if not args.only or s.name in args.only]
    print("| run | steps | expected | raised (first step) | verdict | first detection | time |")
    print("|---|---|---|---|---|---|---|")
    t_all = time.perf_counter()
    detected = faults = false_pos = healthy = 0
    fractions = []
    for sc in runs:
        t0 = time.perf_counter()
        w = scenarios.run(sc, seed=args.seed, console=False, log_every=args.log_every)
        verdict, raised, first = score(sc, w)
        dt = time.perf_counter() - t0
        if sc.expected:
            faults += 1
            detected += verdict == "detected"
            if first is not None:
                fractions.append(first / sc.steps)
        else:
            healthy += 1
            false_pos += verdict != "ok"
        got = ", ".join(f"{k} ({s})" for k, s in sorted(raised.items(), key=lambda kv: kv[1])) or "-"
        when = f"step {first} ({100 * first / sc.steps:.1f}%)" if first is not None else "-"
        print(f"| {sc.name} | {sc.steps} | {', '.join(sc.expected) or 'none'} | {got} | {verdict} | {when} | "
              f"{dt:.1f}s |", flush=True)
    mean = 100 * sum(fractions) / len(fractions) if fractions else 0.0
    print(f"\nmean first detection: {mean:.1f}% of the run; wall time {time.perf_counter() - t_all:.0f}s")
    print(f"zoo: recall={detected}/{faults} false_pos={false_pos}/{healthy}")
    return 0 if detected == faults and false_pos == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
