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


class Tally:
    """Scores runs one by one (`add`) and prints the summary lines; shared with benchmarks/field_zoo.py."""

    def __init__(self) -> None:
        self.detected = self.faults = self.false_pos = self.healthy = 0
        self.fractions: list[float] = []
        self.t0 = time.perf_counter()

    def add(self, run, watcher, steps: int) -> tuple[str, str, str]:
        """Score one run (anything with `expected`); its table cells: raised kinds, verdict, first detection."""
        verdict, raised, first = score(run, watcher)
        if run.expected:
            self.faults += 1
            self.detected += verdict == "detected"
            if first is not None:
                self.fractions.append(first / steps)
        else:
            self.healthy += 1
            self.false_pos += verdict != "ok"
        got = ", ".join(f"{k} ({s})" for k, s in sorted(raised.items(), key=lambda kv: kv[1])) or "-"
        when = f"step {first} ({100 * first / steps:.1f}%)" if first is not None else "-"
        return got, verdict, when

    def summary(self, label: str) -> int:
        """Print the mean first detection and `<label>: recall=R/N false_pos=P/M`; 0 if all found, none false."""
        mean = 100 * sum(self.fractions) / len(self.fractions) if self.fractions else 0.0
        print(f"\nmean first detection: {mean:.1f}% of the run; wall time {time.perf_counter() - self.t0:.0f}s")
        print(f"{label}: recall={self.detected}/{self.faults} false_pos={self.false_pos}/{self.healthy}")
        return 0 if self.detected == self.faults and self.false_pos == 0 else 1


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
    tally = Tally()
    for sc in runs:
        t0 = time.perf_counter()
        w = scenarios.run(sc, seed=args.seed, console=False, log_every=args.log_every)
        got, verdict, when = tally.add(sc, w, sc.steps)
        print(f"| {sc.name} | {sc.steps} | {', '.join(sc.expected) or 'none'} | {got} | {verdict} | {when} | "
              f"{time.perf_counter() - t0:.1f}s |", flush=True)
    return tally.summary("zoo")


if __name__ == "__main__":
    raise SystemExit(main())
