"""Saturation: sigmoid gates pinned near 0 or 1, cell output or hidden state pinned at +-1."""

from __future__ import annotations

from collections.abc import Iterable

from ..events import Event, Record
from .base import Detector, LossTrend, finite, layers, pct

# What a gate pinned low / high does to the cell.
_GATE_MEANING = {
    "input": ("the input gate is shut, so nothing new enters the cell",
              "the input gate is always open, so every input is written into the cell unfiltered"),
    "forget": ("the forget gate is shut, so the cell forgets everything at every step",
               "the forget gate is always open, so the cell never forgets and keeps accumulating"),
    "output": ("the output gate is shut, so the hidden state hides the cell",
               "the output gate is always open, so the cell passes to the hidden state unfiltered"),
    "reset": ("the reset gate is shut, so the candidate ignores the past state",
              "the reset gate is always open"),
    "update": ("the update gate is shut, so the state is overwritten at every step",
               "the update gate is always open, so the state never changes"),
}


class _Saturation(Detector):
    """Saturation that is present from the first records on, or that comes with a stalled loss.

    Saturation that comes with learning is not a fault: trained healthy LSTMs often have a third of their
    gate values saturated. threshold: the fraction of values pinned; patience: consecutive records;
    loss_patience and min_delta: what counts as a stalled loss.
    """

    def __init__(self, threshold: float = 0.5, patience: int = 2, loss_patience: int = 100, min_delta: float = 0.05):
        super().__init__()
        self.threshold, self.patience = threshold, patience
        self.loss_patience, self.min_delta = loss_patience, min_delta
        self.trend = LossTrend()
        self.first_step: int | None = None

    def _values(self, record: Record, module: str) -> Iterable[tuple[str, str, float]]:
        raise NotImplementedError

    def _check(self, record: Record) -> Iterable[Event]:
        self.trend.update(record)
        if not any(k.endswith("/h/sat") for k in record.stats):
            return  # this record has no recomputed internals (e.g. a validation-only record)
        if self.first_step is None:
            self.first_step = record.step
        stalled = self.trend.stalled(self.loss_patience, self.min_delta)
        for m in record.modules:
            worst, present = None, False
            for key, label, frac in self._values(record, m):
                present |= frac > self.threshold
                n = self.streak.update(f"{m}/{key}", frac > self.threshold, record.step)
                early = self.streak.since.get(f"{m}/{key}") == self.first_step
                if n >= self.patience and (early or stalled) and (worst is None or frac > worst[2]):
                    worst = (key, label, frac, early)
            if self.latch.check(m, worst is not None, 1.0, present) and worst:
                yield self._event(record, m, *worst)


class GateSaturation(_Saturation):
    """Most values of a sigmoid gate below 0.1 or above 0.9 in a layer."""

    kind = "gate_saturation"

    def _values(self, record, module):
        s = record.stats
        for lab in layers(record, module):
            for gate in ("input", "forget", "output", "reset", "update"):
                left, right = s.get(f"{module}/{lab}/{gate}/sat_left"), s.get(f"{module}/{lab}/{gate}/sat_right")
                if finite(left) and finite(right):
                    yield f"{lab}/{gate}", f"the {gate} gate of layer {lab}", left + right

    def _event(self, record, m, key, label, frac, early):
        lab, gate = key.split("/")
        s = record.stats
        left, right = s[f"{m}/{key}/sat_left"], s[f"{m}/{key}/sat_right"]
        low = left >= right
        when = "from the first step on" if early else "while the loss stalls"
        meaning = _GATE_MEANING.get(gate, ("the gate is pinned shut", "the gate is pinned open"))[0 if low else 1]
        return self.event(record, m, f"{pct(frac)} of the values of {label} are saturated ({pct(left)} below 0.1, "
                          f"{pct(right)} above 0.9; threshold {pct(self.threshold)}), {when}: "
                          f"{meaning}, and the gate's gradient vanishes.",
                          "standardize the inputs (see unnormalized_input), check the gate biases "
                          "(`lstmwatch.remedies.set_forget_bias(model, 1.0)` resets the forget gate to a sane "
                          "start), or lower the learning rate if the saturation grew during training.")


class HiddenSaturation(_Saturation):
    """Cell output tanh(c) or hidden state pinned at +-1."""

    kind = "hidden_saturation"

    def _values(self, record, module):
        s = record.stats
        for lab in layers(record, module):
            for key, label in (("c", "cell output tanh(c)"), ("h", "hidden state")):
                v = s.get(f"{module}/{lab}/{key}/sat")
                if finite(v):
                    yield f"{lab}/{key}", f"the {label} of layer {lab}", v

    def _event(self, record, m, key, label, frac, early):
        when = "from the first step on" if early else "while the loss stalls"
        return self.event(record, m, f"{pct(frac)} of the values of {label} are beyond +-0.9 (threshold "
                          f"{pct(self.threshold)}), {when}: the tanh is saturated, its gradient is close to zero "
                          "and the state carries little beyond a sign.",
                          "standardize the inputs, lower the learning rate, and keep the forget and input gate "
                          "biases near their defaults so the cell state cannot run away "
                          "(`lstmwatch.remedies.set_forget_bias(model, 1.0)`).")
