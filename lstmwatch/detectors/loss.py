"""Loss faults: a loss that does not improve, one that diverges, and overfitting."""

from __future__ import annotations

from collections.abc import Iterable

from ..events import Event, Record
from .base import Detector, LossTrend, Streak, finite, fmt, max_update_ratio


def _sign(mode: str) -> float:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return 1.0 if mode == "min" else -1.0


class StalledLoss(Detector):
    """The loss has not improved relative to the start of the run.

    A flat tail after progress is convergence, not a stall: the latest mean loss is compared with the
    starting level. patience: steps before a stall can be called; min_delta: the relative improvement that
    counts. With updates below `tiny_update` of the weights per step (learning rate far too low) the stall
    is called after `tiny_patience` records, and below `low_update` after `low_patience` steps.
    mode: "min" for a loss, "max" for a score that should rise.
    """

    kind = "stalled_loss"

    def __init__(self, patience: int = 200, min_delta: float = 0.05, mode: str = "min", tiny_update: float = 1e-5,
                 tiny_patience: int = 3, low_update: float = 1e-4, low_patience: int = 50):
        super().__init__()
        self.patience, self.min_delta = patience, min_delta
        self.tiny_update, self.tiny_patience = tiny_update, tiny_patience
        self.low_update, self.low_patience = low_update, low_patience
        self.trend = LossTrend(sign=_sign(mode))
        self.tiny = Streak()
        self.ratios: list[float] = []

    def _check(self, record: Record) -> Iterable[Event]:
        self.trend.update(record)
        r = max_update_ratio(record)
        if r is not None and r > 0:  # no update at all is not_updated's (or no_gradient's) finding
            self.ratios = (self.ratios + [r])[-5:]
        imp = self.trend.improvement()
        if imp is None:
            return
        flat = imp < self.min_delta
        typical = sorted(self.ratios)[len(self.ratios) // 2] if self.ratios else None
        n_tiny = self.tiny.update("run", flat and typical is not None and typical < self.tiny_update, record.step)
        stalled = (n_tiny >= self.tiny_patience
                   or (flat and typical is not None and typical < self.low_update and record.step >= self.low_patience)
                   or (flat and record.step >= self.patience))
        # Cleared only once clearly learning: a loss that hovers at the threshold is raised once.
        if not self.latch.check("", stalled, 1.0, present=imp < 2 * self.min_delta):
            return
        change = f"{'improved' if imp >= 0 else 'worsened'} {abs(100 * imp):.1f}%"
        msg = (f"after {record.step} steps the loss ({fmt(self.trend.latest * self.trend.sign)}) has {change} from "
               f"its starting level ({fmt(self.trend.level0 * self.trend.sign)}; progress counts from "
               f"{100 * self.min_delta:g}%)")
        if typical is not None and typical < self.low_update:
            msg += (f", and each optimizer step changes the weights by only {fmt(typical)} of their norm "
                    "(healthy is about 1e-3): the learning rate is too low")
            hint = ("raise the learning rate 10x-100x (e.g. `torch.optim.Adam(model.parameters(), lr=1e-3)`), or "
                    "find it with a short learning-rate range test.")
        elif typical is not None and typical > 1e-2:
            msg += (f", while each step changes the weights by {fmt(typical)} of their norm (healthy is about 1e-3): "
                    "the learning rate is so high that the steps overshoot")
            hint = "lower the learning rate 10x, or use a schedule: `torch.optim.lr_scheduler.ReduceLROnPlateau(opt)`."
        else:
            msg += (f"; the weights move at a normal rate ({fmt(typical)} of their norm per step)" if typical else "")
            msg += ": the model is not learning from this data"
            hint = ("check that inputs and targets are aligned and normalized, that the loss fits the task, and "
                    "that the gradient reaches the LSTM (see the other lstmwatch warnings).")
        yield self.event(record, "", msg + ".", hint)


class DivergingLoss(Detector):
    """The loss rises well above its best.

    The rise is measured in units of the run's own scale, max(start - best, |start| / 2): `threshold` of
    them for `patience` consecutive records, or `spike` of them in one record. mode: "min" or "max".
    """

    kind = "diverging_loss"

    def __init__(self, threshold: float = 3.0, patience: int = 2, spike: float = 25.0, mode: str = "min"):
        super().__init__()
        self.threshold, self.patience, self.spike = threshold, patience, spike
        # The starting level from the first two steps only: a run that diverges at once must not
        # pull its own yardstick up.
        self.trend = LossTrend(start_steps=2, sign=_sign(mode))

    def _check(self, record: Record) -> Iterable[Event]:
        v = record.stats.get("loss_mean")
        if not finite(v):
            return
        t = self.trend
        best_before = t.best
        t.update(record)
        if best_before is None or t.level0 is None:
            return
        scale = max(t.level0 - best_before, abs(t.level0) / 2, 1e-12)
        v = t.latest * t.sign  # smoothed as the best was: one bad small batch is not a divergence
        rise = (t.latest - best_before) / scale
        n = self.streak.update("run", rise > self.threshold, record.step)
        active = n >= self.patience or rise > self.spike
        if self.latch.check("", active, max(rise, 1.0), present=rise > self.threshold):
            yield self.event(record, "", f"the loss rose to {fmt(v)}, {rise:.1f}x the run's scale "
                             f"({fmt(scale)}) above its best of {fmt(best_before * t.sign)} (threshold "
                             f"{self.threshold:g}x for {self.patience} logging steps): training is diverging; "
                             "the learning rate is too high.",
                             "lower the learning rate 10x, e.g. `torch.optim.Adam(model.parameters(), lr=1e-3)`, "
                             "and clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`.")


class Overfitting(Detector):
    """The validation loss rises for `patience` evaluations while the training loss keeps falling.

    min_delta: relative change that counts as an improvement of the validation loss; threshold: how far
    (relative) the recent validation losses must sit above their best; the training loss must have fallen
    by `train_delta` (relative) since the best evaluation. mode: "min" for losses, "max" for scores.
    """

    kind = "overfitting"

    def __init__(self, patience: int = 3, min_delta: float = 0.0, threshold: float = 0.1, train_delta: float = 0.1,
                 mode: str = "min"):
        super().__init__()
        self.patience, self.min_delta, self.threshold, self.train_delta = patience, min_delta, threshold, train_delta
        self.sign = _sign(mode)
        self.best: float | None = None
        self.best_step = 0
        self.train_at_best: float | None = None
        self.since: list[float] = []
        self.train = LossTrend(sign=self.sign)

    def _check(self, record: Record) -> Iterable[Event]:
        self.train.update(record)
        v = record.val_loss
        if not finite(v):
            return
        v *= self.sign
        if self.best is None or v < self.best - self.min_delta * abs(self.best):
            self.best, self.best_step, self.train_at_best, self.since = v, record.step, self.train.latest, []
            self.latch.check("", False)
            return
        self.since.append(v)
        recent = self.since[-self.patience:]
        tr, tb = self.train.latest, self.train_at_best
        falling = tr is not None and tb is not None and tr < tb - self.train_delta * abs(tb)
        active = (len(self.since) >= self.patience and min(recent) > self.best + self.threshold * abs(self.best)
                  and falling)
        if self.latch.check("", active, 1.0):
            s = self.sign
            yield self.event(record, "", f"the validation loss has not improved for {len(self.since)} evaluations "
                             f"and now sits at {fmt(v * s)}, above its best of {fmt(self.best * s)} at step "
                             f"{self.best_step}, while the training loss fell from {fmt(tb * s)} to {fmt(tr * s)}: "
                             "the model memorizes the training set.",
                             "add dropout (`nn.LSTM(..., dropout=0.3)` between layers, `nn.Dropout` before the "
                             "head), use a smaller hidden size, weight decay "
                             "(`torch.optim.AdamW(model.parameters(), weight_decay=1e-2)`), more data, or stop "
                             f"early at the best validation step ({self.best_step}).")
