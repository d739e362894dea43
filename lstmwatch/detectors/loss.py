"""Loss faults: a loss that does not improve, one that diverges, and overfitting."""

from __future__ import annotations

import math
from collections import deque

from .. import keys
from ..events import Record
from .base import Detector, Fact, Streak, finite, fmt, times
from .trend import LossTrend


def _sign(mode: str) -> float:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return 1.0 if mode == "min" else -1.0


CONSTANT_RECORDS = 5  # logging records in a row, from the first, with exactly the same loss: steps 1 to 16

class StalledLoss(Detector):
    """The loss has not improved relative to the start of the run.

    A flat tail after progress is convergence, not a stall: the latest mean loss is compared with the
    starting level. patience: steps before a stall can be called; min_delta: the relative improvement that
    counts. With updates below `tiny_update` of the weights per step (learning rate far too low) the stall
    is called after `tiny_patience` records, and below `low_update` after `low_patience` steps.
    mode: "min" for a loss, "max" for a score that should rise.
    """

    kind = "stalled_loss"
    needs_trend = True
    _state = ("tiny", "ratios", "first_loss", "same")

    def __init__(self, patience: int = 200, min_delta: float = 0.05, mode: str = "min", tiny_update: float = 1e-5,
                 tiny_patience: int = 3, low_update: float = 1e-4, low_patience: int = 50):
        super().__init__()
        self.patience, self.min_delta = patience, min_delta
        self.tiny_update, self.tiny_patience = tiny_update, tiny_patience
        self.low_update, self.low_patience = low_update, low_patience
        self.sign = _sign(mode)
        self.tiny = Streak()
        self.ratios: list[float] = []  # the update ratios of the last 5 records that moved the weights
        self.first_loss: float | None = None  # the first record's loss
        self.same = 0  # records in a row from the first whose loss is exactly first_loss (0 once one differs)

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        r = record.max_update_ratio()
        if r is not None and r > 0:  # no update at all is not_updated's (or no_gradient's) finding
            self.ratios = (self.ratios + [r])[-5:]
        # A loss bit-for-bit the same on every record from the first, no gradient reaching the weights: the loss
        # does not depend on them at all.
        # (With no gradient at all: a constant loss whose gradients are not zero is a frozen model on one batch.)
        grad = record.get(keys.GRAD_NORM)
        if record.loss is not None and math.isfinite(record.loss) and not grad:
            if self.first_loss is None:
                self.first_loss, self.same = record.loss, 1
            elif self.same and record.loss == self.first_loss:
                self.same += 1
            else:
                self.same = 0
        constant = self.same >= CONSTANT_RECORDS
        imp = trend.improvement(self.sign)
        if imp is None:
            return []
        typical = sorted(self.ratios)[len(self.ratios) // 2] if self.ratios else None

        def stalled(after: int) -> bool:
            return trend.stalled(after, self.min_delta, self.sign, step=record.step)

        n_tiny = self.tiny.update("run", stalled(0) and typical is not None and typical < self.tiny_update,
                                  record.step)
        low = typical is not None and typical < self.low_update
        active = n_tiny >= self.tiny_patience or (low and stalled(self.low_patience)) or stalled(self.patience)
        # A loss several times its starting level has diverged (diverging_loss names it): updates that look tiny
        # there are tiny against weights that blew up, not a learning rate too low.
        active = (active and not trend.diverged(self.sign)) or constant
        # Cleared only once clearly learning: a loss that hovers at the threshold is raised once.
        if not self.latch.check("", active, 1.0, imp < 2 * self.min_delta, record.step):
            return []
        latest, level0 = trend.latest, trend.level0()
        assert latest is not None and level0 is not None  # an improvement needs both
        values = {"steps": record.step, "loss": latest, "start": level0, "improvement": imp,
                  "min_delta": self.min_delta}
        if typical is not None:
            values["update_ratio"] = typical
        # What the update ratio says of the learning rate (healthy is about 1e-3 of the weights per step).
        cause = "constant" if constant else "lr_low" if low else "lr_high" if typical is not None and typical > 1e-2 \
            else "data"
        return [Fact("", variant=cause, values=values)]

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        imp = v["improvement"]
        change = f"{'improved' if imp >= 0 else 'worsened'} {abs(100 * imp):.1f}%"
        if abs(100 * imp) < 0.05:  # "worsened 0.0%" reads as a contradiction
            change = "not moved"
        msg = (f"after {v['steps']} steps the loss ({fmt(v['loss'])}) has {change} from its starting level "
               f"({fmt(v['start'])}; progress counts from {100 * v['min_delta']:g}%)")
        typical = v.get("update_ratio")
        if fact.variant == "constant":
            msg = (f"the loss has been exactly {fmt(v['loss'])} on every logging step since the first ({v['steps']} "
                   "steps): it does not depend on the weights, so no gradient reaches them and whatever moves them "
                   "(weight decay) is not learning")
            hint = ("compute the loss from the model's output tensor without leaving autograd: no `.item()`, "
                    "`.detach()`, `.numpy()` or `torch.tensor(...)` rewrap between the output and `loss.backward()`.")
        elif fact.variant == "lr_low":
            msg += (f", and each optimizer step changes the weights by only {fmt(v['update_ratio'])} of their norm "
                    "(healthy is about 1e-3): the learning rate is too low")
            hint = ("raise the learning rate 10x-100x (e.g. `torch.optim.Adam(model.parameters(), lr=1e-3)`), or "
                    "find it with a short learning-rate range test.")
        elif fact.variant == "lr_high":
            msg += (f", while each step changes the weights by {fmt(v['update_ratio'])} of their norm (healthy is "
                    "about 1e-3): the learning rate is so high that the steps overshoot")
            hint = "lower the learning rate 10x, or use a schedule: `torch.optim.lr_scheduler.ReduceLROnPlateau(opt)`."
        else:
            msg += (f"; the weights move at a normal rate ({fmt(typical)} of their norm per step)" if typical else "")
            msg += ": the model is not learning from this data"
            hint = ("check that inputs and targets are aligned and normalized, that the loss fits the task, and "
                    "that the gradient reaches the LSTM (see the other lstmwatch warnings).")
        return msg + ".", hint


class DivergingLoss(Detector):
    """The loss rises well above its best.

    The rise is measured in units of the run's own scale, max(start - best, |start| / 2, noise): `threshold` of
    them for `patience` consecutive records, or `spike` of them in one record (its mean and its last step).
    The noise is the standard error of the rise itself, from the spread of the per-step losses (the trend's):
    on small noisy batches a best or a start over a few steps is as much luck as level. mode: "min" or "max".
    """

    kind = "diverging_loss"
    needs_trend = True

    def __init__(self, threshold: float = 3.0, patience: int = 2, spike: float = 25.0, mode: str = "min"):
        super().__init__()
        self.threshold, self.patience, self.spike = threshold, patience, spike
        self.sign = _sign(mode)

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        if not finite(record.get(keys.LOSS_MEAN)):
            return []
        s = self.sign
        # The starting level from the first two steps only: a run that diverges at once must not pull its
        # own yardstick up. All in the direction of the mode (s * raw), as the best before this record.
        best_raw, level0_raw, latest_raw = trend.best(s, prior=True), trend.level0(2), trend.latest
        if best_raw is None or level0_raw is None or latest_raw is None:
            return []
        best, level0, latest = s * best_raw, s * level0_raw, s * latest_raw
        # Never finer than the noise of the difference itself, from the per-step spread of the loss: a best
        # over a few steps of a noisy loss (batches of one) is as much luck as level.
        floor = max(level0 - best, abs(level0) / 2, 1e-12)
        scale = max(floor, trend.noise(s))
        rise = (latest - best) / scale  # smoothed as the best was: one bad small batch is not a divergence
        n = self.streak.update("run", rise > self.threshold, record.step)
        # A spike: one record far above, against the spread known before it (a blow-up that falls back within
        # its record must not widen its own yardstick), its last step as well as its mean (one bad batch is not).
        spike_scale = max(floor, trend.noise(s, prior=True))
        last = record.get(keys.LOSS)
        spike = min((latest - best) / spike_scale, (s * last - best) / spike_scale if finite(last) else math.inf)
        if n < self.patience and spike > self.spike:
            rise, scale = (latest - best) / spike_scale, spike_scale  # the rise that raised it
        active = n >= self.patience or spike > self.spike
        if not self.latch.check("", active, max(rise, 1.0), rise > self.threshold, record.step):
            return []
        return [Fact("", values={"loss": latest_raw, "rise": rise, "scale": scale, "best": best_raw,
                                 "threshold": self.threshold, "patience": self.patience})]

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        return (f"the loss rose to {fmt(v['loss'])}, {times(v['rise'])}x the run's scale ({fmt(v['scale'])}) above its "
                f"best of {fmt(v['best'])} (threshold {v['threshold']:g}x for {v['patience']} logging steps): "
                "training is diverging; the learning rate is too high.",
                "lower the learning rate 10x, e.g. `torch.optim.Adam(model.parameters(), lr=1e-3)`, "
                "and clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`.")


class Overfitting(Detector):
    """The validation loss rises for `patience` evaluations while the training loss keeps falling.

    min_delta: relative change that counts as an improvement of the validation loss; threshold: how far
    (relative) the recent validation losses must sit above their best; the training loss must have fallen
    by `train_delta` (relative) since the best evaluation. mode: "min" for losses, "max" for scores.
    """

    kind = "overfitting"
    needs_trend = True
    _state = ("best", "best_step", "train_at_best", "since", "evaluations")

    def __init__(self, patience: int = 3, min_delta: float = 0.0, threshold: float = 0.1, train_delta: float = 0.1,
                 mode: str = "min"):
        super().__init__()
        self.patience, self.min_delta, self.threshold, self.train_delta = patience, min_delta, threshold, train_delta
        self.sign = _sign(mode)
        # In the direction of the mode (sign * raw): lower is better.
        self.best: float | None = None
        self.best_step = 0
        self.train_at_best: float | None = None
        self.since: deque[float] = deque(maxlen=max(patience, 1))  # the latest validation losses since the best
        self.evaluations = 0  # evaluations since the best

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        v = record.val_loss
        if not finite(v):
            return []
        s = self.sign
        v *= s
        # The training loss as last seen finite: after a NaN it stays where it was.
        train = None if trend.latest_unbroken is None else s * trend.latest_unbroken
        if self.best is None or v < self.best - self.min_delta * abs(self.best):
            self.best, self.best_step, self.train_at_best, self.evaluations = v, record.step, train, 0
            self.since.clear()
            self.latch.check("", False, step=record.step)
            return []
        self.since.append(v)
        self.evaluations += 1
        tr, tb = train, self.train_at_best
        falling = tr is not None and tb is not None and tr < tb - self.train_delta * abs(tb)
        active = (self.evaluations >= self.patience and min(self.since) > self.best + self.threshold * abs(self.best)
                  and falling)
        if not self.latch.check("", active, step=record.step):
            return []
        assert tr is not None and tb is not None  # falling
        return [Fact("", values={"evaluations": self.evaluations, "val_loss": v * s, "best": self.best * s,
                                 "best_step": self.best_step, "train_at_best": tb * s, "train": tr * s,
                                 "threshold": self.threshold, "train_delta": self.train_delta})]

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        best_step = v["best_step"]
        return (f"the validation loss has not improved for {v['evaluations']} evaluations and now sits at "
                f"{fmt(v['val_loss'])}, above its best of {fmt(v['best'])} at step {best_step}, while the training "
                f"loss fell from {fmt(v['train_at_best'])} to {fmt(v['train'])}: the model memorizes the training set.",
                "add dropout (`nn.LSTM(..., dropout=0.3)` between layers, `nn.Dropout` before the "
                "head), use a smaller hidden size, weight decay "
                "(`torch.optim.AdamW(model.parameters(), weight_decay=1e-2)`), more data, or stop "
                f"early at the best validation step ({best_step}).")
