"""lstmwatch: tells you why your PyTorch LSTM is not learning, while it trains."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import remedies
from .events import (
    DivergingLossWarning,
    Event,
    ExplodingGradientWarning,
    GateSaturationWarning,
    HiddenSaturationWarning,
    LSTMWatchFailure,
    LSTMWatchWarning,
    NoGradientWarning,
    NonFiniteWarning,
    NotUpdatedWarning,
    OverfittingWarning,
    PaddingWarning,
    StalledLossWarning,
    UnnormalizedInputWarning,
    VanishingGradientWarning,
)
from .gates import CellGates, GateTrace, GRUCellGates, GRUTrace, gru_cell_gates, gru_gates, lstm_cell_gates, lstm_gates
from .record import Record
from .version import __version__
from .watch import Watcher, watch

if TYPE_CHECKING:
    from .run import Run


def load(path: str | os.PathLike[str]) -> Run:
    """Read a run log written with watch(..., log_dir=...) (or a folder's newest): a Run with header, records
    and events."""
    from .runlog import load as _load

    return _load(path)


def plot(run: Any) -> Any:
    """One matplotlib Figure of a Run, a Watcher or a run log path (needs the [plots] extra)."""
    from .report import plot as _plot

    return _plot(run)


__all__ = [
    "watch", "Watcher", "lstm_gates", "gru_gates", "GateTrace", "GRUTrace", "lstm_cell_gates", "gru_cell_gates",
    "CellGates", "GRUCellGates", "Event", "Record",
    "LSTMWatchWarning", "LSTMWatchFailure", "ExplodingGradientWarning", "VanishingGradientWarning",
    "NoGradientWarning", "NotUpdatedWarning", "StalledLossWarning", "DivergingLossWarning", "NonFiniteWarning",
    "GateSaturationWarning", "HiddenSaturationWarning", "UnnormalizedInputWarning", "PaddingWarning",
    "OverfittingWarning", "load", "plot", "remedies", "__version__",
]
