"""lstmwatch: tells you why your PyTorch LSTM is not learning, while it trains."""

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
    Record,
    StalledLossWarning,
    UnnormalizedInputWarning,
    VanishingGradientWarning,
)
from .gates import GateTrace, GRUTrace, gru_gates, lstm_gates
from .watch import Watcher, watch

__version__ = "0.1.0"


def load(path):  # noqa: ANN001, ANN201 - typed in lstmwatch.runlog
    """Read a run log written with watch(..., log_dir=...): a Run with header, records and events."""
    from .runlog import load as _load

    return _load(path)


def plot(run):  # noqa: ANN001, ANN201 - typed in lstmwatch.report.plot
    """One matplotlib Figure of a Run, a Watcher or a run log path (needs the [plots] extra)."""
    from .report.plot import plot as _plot

    return _plot(run)

__all__ = [
    "watch", "Watcher", "lstm_gates", "gru_gates", "GateTrace", "GRUTrace", "Event", "Record",
    "LSTMWatchWarning", "LSTMWatchFailure", "ExplodingGradientWarning", "VanishingGradientWarning",
    "NoGradientWarning", "NotUpdatedWarning", "StalledLossWarning", "DivergingLossWarning", "NonFiniteWarning",
    "GateSaturationWarning", "HiddenSaturationWarning", "UnnormalizedInputWarning", "PaddingWarning",
    "OverfittingWarning", "load", "plot", "__version__",
]
