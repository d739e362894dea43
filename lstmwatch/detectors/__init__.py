"""Detectors: plain objects whose update(record) returns events. They never act by themselves."""

from __future__ import annotations

from typing import Any

from .base import Detector, Latch, LossTrend
from .gradients import ExplodingGradient, NoGradient, NotUpdated, VanishingGradient
from .inputs import Padding, UnnormalizedInput
from .loss import DivergingLoss, Overfitting, StalledLoss
from .nonfinite import NonFinite
from .saturation import GateSaturation, HiddenSaturation

DEFAULTS: dict[str, type[Detector]] = {
    c.kind: c
    for c in (NonFinite, UnnormalizedInput, Padding, ExplodingGradient, VanishingGradient, NoGradient, NotUpdated,
              StalledLoss, DivergingLoss, GateSaturation, HiddenSaturation, Overfitting)
}

__all__ = ["Detector", "Latch", "LossTrend", "DEFAULTS", "default_detectors", *(c.__name__ for c in DEFAULTS.values())]


def default_detectors(**tune: dict[str, Any] | bool) -> list[Detector]:
    """The default detectors; `kind={...}` passes arguments to one, `kind=False` leaves it out."""
    unknown = set(tune) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown detector kind(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = []
    for kind, cls in DEFAULTS.items():
        opt = tune.get(kind, True)
        if opt is False:
            continue
        out.append(cls(**opt) if isinstance(opt, dict) else cls())
    return out
