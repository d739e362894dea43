"""Sinks receive a run: start(header), write(record, events) per logging step, close(summary); one destination each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .console import ConsoleSink
from .runlog_writer import RunLogSink
from .tensorboard import TensorBoardSink  # imports tensorboard only when it makes its own SummaryWriter
from .wandb import WandbSink  # imports wandb only when a WandbSink is made

__all__ = ["ConsoleSink", "RunLogSink", "TensorBoardSink", "WandbSink", "check_options", "make_sinks"]

OPTIONS = ("sinks", "log_dir", "log_path", "wandb", "wandb_keys", "tensorboard", "tensorboard_keys")


def check_options(**options: Any) -> None:
    """What every rank can check of watch()'s sink options without making a sink (rank 0 alone makes them):
    their names, and options that exclude each other. A typo fails on every rank, not on rank 0 alone."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"watch() got unexpected keyword argument(s): {', '.join(unknown)}")
    if options.get("log_dir") is not None and options.get("log_path") is not None:
        raise ValueError("give log_dir= (a folder, one new file per run) or log_path= (one file), not both")


def make_sinks(
    console: bool = True,
    sinks: list[Any] | None = None,
    *,
    log_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    wandb: Any = None,
    wandb_keys: str | Sequence[str] | None = None,
    tensorboard: Any = None,
    tensorboard_keys: str | Sequence[str] | None = None,
    **options: Any,
) -> list[Any]:
    """The sinks a watch() call asked for; what cannot work (no W&B run, a folder not writable, a writer that is
    not one) fails here."""
    check_options(log_dir=log_dir, log_path=log_path, **options)
    out: list[Any] = [ConsoleSink()] if console else []
    if log_dir is not None or log_path is not None:
        out.append(RunLogSink(log_dir, path=log_path))
    if wandb is True:
        out.append(WandbSink(keys=wandb_keys))  # the active run, or a RuntimeError saying to call wandb.init
    elif wandb is not None and wandb is not False:
        out.append(WandbSink(wandb, keys=wandb_keys))
    if tensorboard is not None and tensorboard is not False:
        # True: a SummaryWriter in runs/; a folder: a SummaryWriter there; else the user's own writer.
        out.append(TensorBoardSink(tensorboard, keys=tensorboard_keys))
    return out + list(sinks or [])
