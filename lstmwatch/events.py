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


def _warning(kind: str, doc: str) -> type[LSTMWatchWarning]:
    name = "".join(p.capitalize() for p in kind.split("_")) + "Warning"
    return type(name, (LSTMWatchWarning,), {"kind": kind, "__doc__": doc, "__module__": "lstmwatch"})


ExplodingGradientWarning = _warning("exploding_gradient", "Gradient norms far above the run's own level.")
VanishingGradientWarning = _warning("vanishing_gradient", "Early layers or timesteps get vanishing gradient.")
NoGradientWarning = _warning("no_gradient", "An LSTM gets no gradient, or an exactly zero one.")
NotUpdatedWarning = _warning("not_updated", "An LSTM gets gradients but its weights do not change.")
StalledLossWarning = _warning("stalled_loss", "The loss has not improved since the start of the run.")
DivergingLossWarning = _warning("diverging_loss", "The loss rises well above its best.")
NonFiniteWarning = _warning("nonfinite", "A NaN or Inf appeared.")
GateSaturationWarning = _warning("gate_saturation", "Sigmoid gates pinned near 0 or 1.")
HiddenSaturationWarning = _warning("hidden_saturation", "Cell output or hidden state pinned at +-1.")
UnnormalizedInputWarning = _warning("unnormalized_input", "Inputs far from zero mean and unit scale.")
PaddingWarning = _warning("padding", "Zero padding fed as a plain tensor rather than a PackedSequence.")
OverfittingWarning = _warning("overfitting", "Validation loss rises while training loss falls.")

WARNINGS: dict[str, type[LSTMWatchWarning]] = {
    c.kind: c
    for c in (
        ExplodingGradientWarning, VanishingGradientWarning, NoGradientWarning, NotUpdatedWarning,
        StalledLossWarning, DivergingLossWarning, NonFiniteWarning, GateSaturationWarning,
        HiddenSaturationWarning, UnnormalizedInputWarning, PaddingWarning, OverfittingWarning,
    )
}


def warning_for(event: Event) -> LSTMWatchWarning:
    """The typed warning instance that carries an event."""
    return WARNINGS.get(event.kind, LSTMWatchWarning)(event)


class LSTMWatchFailure(LSTMWatchWarning):
    """lstmwatch itself could not do something (a sink or detector failed); training goes on."""

    kind = "failure"
