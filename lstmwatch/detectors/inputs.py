"""Input faults: unnormalized features, and zero padding fed as data."""

from __future__ import annotations

from .. import keys
from ..events import Record
from .base import Detector, Fact, finite, fmt, pct
from .trend import LossTrend

_STANDARDIZE = ("standardize each feature with statistics of the training set: "
                "`mean, std = x_train.mean(dim=(0, 1)), x_train.std(dim=(0, 1))`, then "
                "`x = (x - mean) / (std + 1e-8)` (or min-max scale to [0, 1]); apply the same to "
                "validation and test data.")


class UnnormalizedInput(Detector):
    """Inputs far from zero mean and unit scale.

    max_mean: largest |per-feature mean| tolerated; max_std: largest per-feature std; min_std: below this
    every feature is nearly constant; patience: consecutive records (the data's scale does not change,
    so one is enough).
    """

    kind = "unnormalized_input"

    def __init__(self, max_mean: float = 5.0, max_std: float = 5.0, min_std: float = 1e-3, patience: int = 1):
        super().__init__()
        self.max_mean, self.max_std, self.min_std, self.patience = max_mean, max_std, min_std, patience

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        mean = record.get(keys.data_key(module, "feat_mean_absmax"))
        std = record.get(keys.data_key(module, "feat_std_max"))
        if not (finite(mean) and finite(std)):
            return None
        big = mean > self.max_mean or std > self.max_std
        tiny = std < self.min_std and mean < self.min_std
        if not self.persists(module, big or tiny, record.step, self.patience, max(mean, std, 1.0)):
            return None
        values = {"feat_mean_absmax": mean, "feat_std_max": std}
        absmax = record.get(keys.data_key(module, "absmax"))
        if absmax is not None:
            values["absmax"] = absmax
        if big:
            values.update(max_mean=self.max_mean, max_std=self.max_std)
        else:
            values["min_std"] = self.min_std
        return Fact(module, variant="big" if big else "constant", values=values)

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        if fact.variant == "big":
            msg = (f"the input features have means up to {fmt(v['feat_mean_absmax'])} and standard deviations up to "
                   f"{fmt(v['feat_std_max'])} (|x| reaches {fmt(v.get('absmax', 0))}; thresholds: |mean| "
                   f"{v['max_mean']:g}, std {v['max_std']:g}): the gates' pre-activations are pushed far from 0, "
                   "the sigmoids and tanh saturate and their gradients vanish.")
        else:
            msg = (f"every input feature is nearly constant (std at most {fmt(v['feat_std_max'])}, threshold "
                   f"{v['min_std']:g}): the LSTM sees almost no signal.")
        return msg, _STANDARDIZE


class Padding(Detector):
    """Batches with many trailing all-zero timesteps fed as a plain tensor rather than a PackedSequence.

    threshold: fraction of the timesteps that are trailing zeros; patience: consecutive records.
    """

    kind = "padding"

    def __init__(self, threshold: float = 0.1, patience: int = 2):
        super().__init__()
        self.threshold, self.patience = threshold, patience

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        v = record.get(keys.data_key(module, "pad_frac"))
        if finite(v) and self.persists(module, v > self.threshold, record.step, self.patience):
            return Fact(module, values={"pad_frac": v, "threshold": self.threshold})
        return None

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        return (f"{pct(v['pad_frac'])} of the timesteps in the batch are trailing all-zero steps "
                f"(threshold {pct(v['threshold'])}) fed as a plain tensor: the LSTM runs on through "
                "the padding, so its final state and h_n describe zeros, not the sequence.",
                "pack the batch with the true lengths: `packed = nn.utils.rnn.pack_padded_sequence("
                "x, lengths, batch_first=True, enforce_sorted=False)`, `out, (h_n, c_n) = "
                "lstm(packed)`, and read `h_n[-1]` (or unpack with `pad_packed_sequence`).")
