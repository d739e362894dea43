"""Score lstmwatch on training programs as people write them: healthy as their authors run them, or with a fault
people really make. Each run has its own loop (benchmarks/field_recipes.py), watched with lstmwatch's defaults.

    python benchmarks/field_zoo.py [--seed 0] [--threads 1] [--only NAME ...]

Scored as benchmarks/zoo.py scores its runs: a faulty run is detected when one of its expected kinds is raised
(warning or error), a healthy run must raise none. Last line: `field zoo: recall=R/N false_pos=P/M`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import field_recipes as r  # noqa: E402
from zoo import Tally  # noqa: E402


@dataclass(frozen=True)
class FieldRun:
    """A named training program, the kinds lstmwatch should raise on it (none: healthy), and what it mirrors."""

    name: str
    program: str
    expected: tuple[str, ...]
    train: Callable[..., object] = field(repr=False)


RUNS: list[FieldRun] = [
    # --- healthy, as their authors run them
    FieldRun("wlm_tied_sgd20", "word LM: tied 2-layer LSTM, state carried and detached, clip 0.25, manual SGD lr 20, "
             "lr/4 on plateau", (), r.word_lm),
    FieldRun("timeseq_lbfgs_f64", "two LSTMCells stepped by hand, float64, LBFGS lr 0.8 with a closure", (),
             r.time_sequence),
    FieldRun("names_packed", "name classifier: padded, sorted and packed batches, Adam 1e-3", (), r.name_classifier),
    FieldRun("seq2seq_tf05", "seq2seq 2+2 layers, seq-first, teacher forcing 0.5, Adam, clip 1", (), r.seq2seq),
    FieldRun("char_rnn_batch1", "char-RNN: batch of one, one call per character, Adam 0.005", (), r.char_rnn),
    FieldRun("keras_sentiment", "Keras-style sentiment LSTM, pre-padding, dropout 0.2, Adam 1e-3, val per epoch", (),
             r.keras_sentiment),
    FieldRun("stock_minmax", "stock forecasting notebook: MinMax-scaled closes, 60-day windows, 2x LSTM(50)", (),
             r.stock_forecast),
    # --- the faults people make
    FieldRun("wlm_adam_lr20", "word LM with the manual update swapped for Adam, lr 20 kept",
             ("diverging_loss", "exploding_gradient", "nonfinite"), functools.partial(r.word_lm, optimizer="adam")),
    FieldRun("timeseq_sgd_f64_blowup", "the float64 cell model with LBFGS swapped for SGD lr 2: loss passes 1e+120, "
             "finite", ("diverging_loss", "exploding_gradient"),
             functools.partial(r.time_sequence, optimizer="sgd", lr=2.0, steps=60)),
    FieldRun("keras_sentiment_lr100x", "the sentiment port with Adam lr 0.1 instead of 1e-3",
             ("exploding_gradient", "diverging_loss", "stalled_loss"),
             functools.partial(r.keras_sentiment, lr=0.1)),
    FieldRun("names_padded_unpacked", "name classifier fed the padded tensor, read at out[:, -1]", ("padding",),
             functools.partial(r.name_classifier, packed=False)),
    FieldRun("stock_raw_prices", "stock notebook with the MinMax scaler forgotten (prices 50-300)",
             ("unnormalized_input",), functools.partial(r.stock_forecast, scale=False)),
    FieldRun("stock_zero_grad_between", "optimizer.zero_grad() between backward() and step()",
             ("not_updated", "stalled_loss"), functools.partial(r.stock_forecast, fault="zero_grad_between", epochs=5)),
    FieldRun("numpy_loss_detached", "full-batch loss computed in numpy, rewrapped with requires_grad=True: constant",
             ("no_gradient", "stalled_loss"), r.full_batch_detached),
    FieldRun("label_at_first_of_200", "4-layer LSTM, 200 steps, the class set at the first step (a faint cue at "
             "the last: the loss moves a little)", ("vanishing_gradient",),
             functools.partial(r.event_at_start, cue_at_end=0.5)),
    FieldRun("loss_divided_by_n", "MSE mean divided again by the dataset size, SGD 0.01, 1000 steps",
             ("stalled_loss",), r.double_averaged),
]


def _losses(watcher) -> str:
    """The loss at the first and the last logging step (the records lstmwatch kept)."""
    ls = [rec.stats["loss"] for rec in watcher.records if "loss" in rec.stats]
    return f"{ls[0]:.3g} → {ls[-1]:.3g}" if ls else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [s for s in RUNS if not args.only or s.name in args.only]
    print("| run | program | steps | loss first → last | expected | raised (first step) | verdict | first detection "
          "| time |")
    print("|---|---|---|---|---|---|---|---|---|")
    tally = Tally()
    for run in runs:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the programs' own deprecation chatter; lstmwatch is silenced below
            w = run.train(args.seed, console=False)
        got, verdict, when = tally.add(run, w, w.step_count)
        print(f"| {run.name} | {run.program} | {w.step_count} | {_losses(w)} | {', '.join(run.expected) or 'none'} "
              f"| {got} | {verdict} | {when} | {time.perf_counter() - t0:.1f}s |", flush=True)
    return tally.summary("field zoo")


if __name__ == "__main__":
    raise SystemExit(main())
