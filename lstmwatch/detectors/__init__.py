"""Detectors: plain objects whose update(record) returns events. They never act by themselves."""

from __future__ import annotations

from .base import Detector, Fact, Latch, Streak
from .gradients import ExplodingGradient, NoGradient, NotUpdated, VanishingGradient
from .inputs import Padding, UnnormalizedInput
from .loss import DivergingLoss, Overfitting, StalledLoss
from .nonfinite import NonFinite
from .saturation import GateSaturation, HiddenSaturation
from .suite import DEFAULTS, Detectors, default_detectors
from .trend import LossTrend

__all__ = [
    "DEFAULTS", "Detector", "Detectors", "Fact", "Latch", "LossTrend", "Streak", "default_detectors",
    "DivergingLoss", "ExplodingGradient", "GateSaturation", "HiddenSaturation", "NoGradient", "NonFinite",
    "NotUpdated", "Overfitting", "Padding", "StalledLoss", "UnnormalizedInput", "VanishingGradient",
]
