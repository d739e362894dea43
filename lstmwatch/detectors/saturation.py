"""Saturation: sigmoid gates pinned near 0 or 1, cell output or hidden state pinned at +-1."""

from __future__ import annotations

from collections.abc import Iterable

from .. import keys
from ..events import Record
from .base import Detector, Fact, finite, pct
from .trend import LossTrend

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
_SIGMOID_GATES = tuple(_GATE_MEANING)  # LSTM and GRU gates, in the order ties are broken
_STATES = (("c", "cell output tanh(c)"), ("h", "hidden state"))
GRU_GATES = frozenset({"reset", "update", "new"})  # a GRU's or GRUCell's; an LSTM's are input, forget, cell, output
LSTM_GATES = frozenset({"input", "forget", "cell", "output"})


def is_gru(record: Record, module: str) -> bool | None:
    """Whether a module is a GRU (or GRUCell), told by the gates recorded for it; None when none are."""
    for lab in record.layers(module):
        gates = set(record.gates(module, lab))
        if gates & GRU_GATES:
            return True
        if gates & LSTM_GATES:
            return False
    return None


class KnowsType:
    """Remembers which watched modules are GRUs, so that the words of a fault fit the module (no forget gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.grus: dict[str, bool] = {}  # module -> whether it is a GRU; read again from each record, not saved

    def note_type(self, record: Record, module: str) -> None:
        """Read the module's type from a record (the latest known stays when this one has no gates)."""
        gru = is_gru(record, module)
        if gru is not None:
            self.grus[module] = gru

    def gru(self, module: str) -> bool:
        """Whether the module was last seen as a GRU; an unknown module is taken for an LSTM."""
        return self.grus.get(module, False)


class _Saturation(KnowsType, Detector):
    """Saturation that is present from the first records on, or that comes with a stalled loss.

    Saturation that comes with learning is not a fault: trained healthy LSTMs often have a third of their
    gate values saturated. threshold: the fraction of values pinned; patience: consecutive records;
    loss_patience and min_delta: what counts as a stalled loss.
    """

    needs_trend = True
    _state = ("first_step",)

    def __init__(self, threshold: float = 0.5, patience: int = 2, loss_patience: int = 100, min_delta: float = 0.05):
        super().__init__()
        self.threshold, self.patience = threshold, patience
        self.loss_patience, self.min_delta = loss_patience, min_delta
        self.first_step: int | None = None  # the first record with recomputed internals

    def _values(self, record: Record, module: str) -> Iterable[tuple[str, dict[str, float]]]:
        """(where: 'l0/forget', {'frac': pinned fraction, ...}) for each gate or state measured."""
        raise NotImplementedError

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        if not record.has_internals():
            return []  # this record has no recomputed internals (e.g. a validation-only record)
        if self.first_step is None:
            self.first_step = record.step
        return super()._decide(record, trend)

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        self.note_type(record, module)
        stalled = trend.stalled(self.loss_patience, self.min_delta)
        worst: Fact | None = None
        present = False
        for where, values in self._values(record, module):
            frac = values["frac"]
            present |= frac > self.threshold
            key = f"{module}/{where}"  # a streak per gate (or state) of each layer-direction
            n = self.streak.update(key, frac > self.threshold, record.step)
            early = self.streak.since.get(key) == self.first_step
            if n >= self.patience and (early or stalled) and (worst is None or frac > worst.values["frac"]):
                worst = Fact(module, where, "early" if early else "stalled", {**values, "threshold": self.threshold})
        return worst if self.latch.check(module, worst is not None, 1.0, present, record.step) else None

    @staticmethod
    def _when(fact: Fact) -> str:
        return "from the first step on" if fact.variant == "early" else "while the loss stalls"


class GateSaturation(_Saturation):
    """Most values of a sigmoid gate below 0.1 or above 0.9 in a layer."""

    kind = "gate_saturation"

    def _values(self, record: Record, module: str) -> Iterable[tuple[str, dict[str, float]]]:
        # The layers whose gradient norm was measured: those of a training step's record.
        for lab in record.layers(module, "grad_norm"):
            for gate in _SIGMOID_GATES:
                left = record.get(keys.gate_key(module, lab, gate, "sat_left"))
                right = record.get(keys.gate_key(module, lab, gate, "sat_right"))
                if finite(left) and finite(right):
                    yield f"{lab}/{gate}", {"frac": left + right, "sat_left": left, "sat_right": right}

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        lab, gate = fact.where.split("/")
        left, right = v["sat_left"], v["sat_right"]
        if left >= 2 * right or right >= 2 * left:  # one side dominates: the gate is pinned shut or open
            meaning = _GATE_MEANING.get(gate, ("the gate is pinned shut", "the gate is pinned open"))[
                0 if left >= right else 1]
        else:  # both sides: neither shut nor open, an on/off switch
            meaning = (f"the {gate} gate works as an on/off switch, shut for some units and steps and wide open for "
                       "the others")
        hint = ("standardize the inputs (see unnormalized_input), check the gate biases (`bias_ih` and `bias_hh`: "
                "reset, update, new), or lower the learning rate if the saturation grew during training."
                if self.gru(fact.module) else
                "standardize the inputs (see unnormalized_input), check the gate biases "
                "(`lstmwatch.remedies.set_forget_bias(model, 1.0)` resets the forget gate to a sane "
                "start), or lower the learning rate if the saturation grew during training.")
        return (f"{pct(v['frac'])} of the values of the {gate} gate of layer {lab} are saturated ({pct(v['sat_left'])} "
                f"below 0.1, {pct(v['sat_right'])} above 0.9; threshold {pct(v['threshold'])}), {self._when(fact)}: "
                f"{meaning}, and the gate's gradient vanishes.", hint)


class HiddenSaturation(_Saturation):
    """Cell output tanh(c) or hidden state pinned at +-1."""

    kind = "hidden_saturation"

    def _values(self, record: Record, module: str) -> Iterable[tuple[str, dict[str, float]]]:
        for lab in record.layers(module, "grad_norm"):
            for state, _ in _STATES:
                v = record.get(keys.gate_key(module, lab, state, "sat"))
                if finite(v):
                    yield f"{lab}/{state}", {"frac": v}

    def _describe(self, fact: Fact) -> tuple[str, str]:
        lab, state = fact.where.split("/")
        label = dict(_STATES)[state]
        hint = ("standardize the inputs, lower the learning rate, and keep the gate biases near their defaults so "
                "the new-state candidate n cannot run to +-1." if self.gru(fact.module) else
                "standardize the inputs, lower the learning rate, and keep the forget and input gate "
                "biases near their defaults so the cell state cannot run away "
                "(`lstmwatch.remedies.set_forget_bias(model, 1.0)`).")
        return (f"{pct(fact.values['frac'])} of the values of the {label} of layer {lab} are beyond +-0.9 (threshold "
                f"{pct(fact.values['threshold'])}), {self._when(fact)}: the tanh is saturated, its gradient is close "
                "to zero and the state carries little beyond a sign.", hint)
