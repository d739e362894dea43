"""Input faults: unnormalized features, and zero padding fed as data."""

from __future__ import annotations

from collections.abc import Iterable

from ..events import Event, Record
from .base import Detector, finite, fmt, pct


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

    def _check(self, record: Record) -> Iterable[Event]:
        for m in record.modules:
            s = record.of(m)
            mean, std = s.get("data/feat_mean_absmax"), s.get("data/feat_std_max")
            if not (finite(mean) and finite(std)):
                continue
            big = mean > self.max_mean or std > self.max_std
            tiny = std < self.min_std and mean < self.min_std
            if not self.persists(m, big or tiny, record.step, self.patience, max(mean, std, 1.0)):
                continue
            if big:
                msg = (f"the input features have means up to {fmt(mean)} and standard deviations up to {fmt(std)} "
                       f"(|x| reaches {fmt(s.get('data/absmax', 0))}; thresholds: |mean| {self.max_mean:g}, std "
                       f"{self.max_std:g}): the gates' pre-activations are pushed far from 0, the sigmoids and "
                       "tanh saturate and their gradients vanish.")
            else:
                msg = (f"every input feature is nearly constant (std at most {fmt(std)}, threshold "
                       f"{self.min_std:g}): the LSTM sees almost no signal.")
            yield self.event(record, m, msg,
                             "standardize each feature with statistics of the training set: "
                             "`mean, std = x_train.mean(dim=(0, 1)), x_train.std(dim=(0, 1))`, then "
                             "`x = (x - mean) / (std + 1e-8)` (or min-max scale to [0, 1]); apply the same to "
                             "validation and test data.")


class Padding(Detector):
    """Batches with many trailing all-zero timesteps fed as a plain tensor rather than a PackedSequence.

    threshold: fraction of the timesteps that are trailing zeros; patience: consecutive records.
    """

    kind = "padding"

    def __init__(self, threshold: float = 0.1, patience: int = 2):
        super().__init__()
        self.threshold, self.patience = threshold, patience

    def _check(self, record: Record) -> Iterable[Event]:
        for m in record.modules:
            v = record.stats.get(f"{m}/data/pad_frac")
            if not finite(v):
                continue
            if self.persists(m, v > self.threshold, record.step, self.patience):
                yield self.event(record, m, f"{pct(v)} of the timesteps in the batch are trailing all-zero steps "
                                 f"(threshold {pct(self.threshold)}) fed as a plain tensor: the LSTM runs on through "
                                 "the padding, so its final state and h_n describe zeros, not the sequence.",
                                 "pack the batch with the true lengths: `packed = nn.utils.rnn.pack_padded_sequence("
                                 "x, lengths, batch_first=True, enforce_sorted=False)`, `out, (h_n, c_n) = "
                                 "lstm(packed)`, and read `h_n[-1]` (or unpack with `pad_packed_sequence`).")
