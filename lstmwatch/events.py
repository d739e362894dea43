"""Records, events, and the typed warnings that carry events to people."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["info", "warning", "error"]


@dataclass
class Record:
    """What one logging step measured: plain floats, no tensors."""

    step: int
    loss: float | None  # the loss passed to this step
    stats: dict[str, float]  # 'module/l0/forget/sat_right' -> value; keys without '/' are run-wide
    curves: dict[str, list[float]] = field(default_factory=dict)  # 'module/gtt' -> per-timestep norms
    val_loss: float | None = None
    modules: tuple[str, ...] = ()

    def of(self, module: str) -> dict[str, float]:
        """The statistics of one module, keys without the module prefix."""
        p = module + "/"
        return {k[len(p):]: v for k, v in self.stats.items() if k.startswith(p)}


@dataclass(frozen=True)
class Event:
    """A finding: what was measured and what to do about it."""

    step: int
    kind: str
    severity: Severity
    module: str  # qualified name of the LSTM, or "" for the whole model
    message: str  # what was measured, against which threshold, and what it means
    hint: str  # the concrete remedy

    def __str__(self) -> str:
        where = f" · {self.module}" if self.module else ""
        return f"lstmwatch step {self.step}{where} · {self.kind}\n  {self.message}\n  fix: {self.hint}"


class LSTMWatchWarning(UserWarning):
    """Base class of every warning lstmwatch raises; filter it to silence lstmwatch."""

    kind = ""

    def __init__(self, event: Event | str):
        self.event = event if isinstance(event, Event) else None
        super().__init__(str(event))


class ExplodingGradientWarning(LSTMWatchWarning):
    """Gradient norms far above the run's own level."""

    kind = "exploding_gradient"


class VanishingGradientWarning(LSTMWatchWarning):
    """Early layers or timesteps get vanishing gradient."""

    kind = "vanishing_gradient"


class NoGradientWarning(LSTMWatchWarning):
    """An LSTM gets no gradient, or an exactly zero one."""

    kind = "no_gradient"


class NotUpdatedWarning(LSTMWatchWarning):
    """An LSTM gets gradients but its weights do not change."""

    kind = "not_updated"


class StalledLossWarning(LSTMWatchWarning):
    """The loss has not improved since the start of the run."""

    kind = "stalled_loss"


class DivergingLossWarning(LSTMWatchWarning):
    """The loss rises well above its best."""

    kind = "diverging_loss"


class NonFiniteWarning(LSTMWatchWarning):
    """A NaN or Inf appeared."""

    kind = "nonfinite"


class GateSaturationWarning(LSTMWatchWarning):
    """Sigmoid gates pinned near 0 or 1."""

    kind = "gate_saturation"


class HiddenSaturationWarning(LSTMWatchWarning):
    """Cell output or hidden state pinned at +-1."""

    kind = "hidden_saturation"


class UnnormalizedInputWarning(LSTMWatchWarning):
    """Inputs far from zero mean and unit scale."""

    kind = "unnormalized_input"


class PaddingWarning(LSTMWatchWarning):
    """Zero padding fed as a plain tensor rather than a PackedSequence."""

    kind = "padding"


class OverfittingWarning(LSTMWatchWarning):
    """Validation loss rises while training loss falls."""

    kind = "overfitting"


WARNINGS: dict[str, type[LSTMWatchWarning]] = {
    c.kind: c
    for c in (
        ExplodingGradientWarning, VanishingGradientWarning, NoGradientWarning, NotUpdatedWarning,
        StalledLossWarning, DivergingLossWarning, NonFiniteWarning, GateSaturationWarning,
        HiddenSaturationWarning, UnnormalizedInputWarning, PaddingWarning, OverfittingWarning,
    )
}


for _cls in (LSTMWatchWarning, *WARNINGS.values()):
    _cls.__module__ = "lstmwatch"  # users name them lstmwatch.PaddingWarning (filters, -W error::...)


def warning_for(event: Event) -> LSTMWatchWarning:
    """The typed warning instance that carries an event."""
    return WARNINGS.get(event.kind, LSTMWatchWarning)(event)


class LSTMWatchFailure(LSTMWatchWarning):
    """lstmwatch itself could not do something (a sink or detector failed); training goes on."""

    kind = "failure"
