"""Loss faults: a loss that does not improve, one that diverges, and overfitting."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

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
    """The validation loss stays above its best for `patience` evaluations while the training loss keeps falling.

    The recent level (the mean of the evaluations since the best, the last `patience` of them) must sit above the
    best evaluation by `threshold` (relative) and by `noise` standard errors of that difference, from the spread
    of the validation loss between evaluations: on a small or fixed validation set the loss wanders from one
    evaluation to the next, and its best is as much luck as level. The spread comes from the concave bends of
    the validation losses (a second difference below zero), their mean square: learning bends the curve up as
    it flattens, and so does overfitting as the loss turns and rises, so only the noise bends it down (and a
    curve bent up by a trend yields fewer concave bends, not smaller ones).
    The training loss must have fallen since the best evaluation by `train_delta` (relative) and by `train_noise`
    standard errors, from the spread of its per-step rises (the trend's; a falling loss does not widen them): on
    fresh batches a converged model's training loss wanders too, and a wander is not memorization.
    min_delta: relative change that counts as an improvement of the validation loss. mode: "min" for losses,
    "max" for scores.
    """

    kind = "overfitting"
    needs_trend = True
    _state = ("best", "best_step", "train_at_best", "since", "evaluations", "train_steps_at_best", "previous",
              "bends")

    def __init__(self, patience: int = 3, min_delta: float = 0.0, threshold: float = 0.1, train_delta: float = 0.1,
                 mode: str = "min", noise: float = 2.0, train_noise: float = 3.0):
        super().__init__()
        self.patience, self.min_delta, self.threshold, self.train_delta = patience, min_delta, threshold, train_delta
        self.noise, self.train_noise = noise, train_noise
        self.sign = _sign(mode)
        # In the direction of the mode (sign * raw): lower is better.
        self.best: float | None = None
        self.best_step = 0
        self.train_at_best: float | None = None
        self.train_steps_at_best = 0  # the steps the smoothed training loss covered at the best
        self.since: deque[float] = deque(maxlen=max(patience, 1))  # the latest validation losses since the best
        self.evaluations = 0  # evaluations since the best
        self.previous: deque[float] = deque(maxlen=2)  # the two evaluations before this one, for the bends
        # Second differences of the validation loss: [sum of the squared concave ones, how many concave (a flat one
        # counts half), how many in all]. Three evaluations a, b, c of independent noise: a - 2b + c has variance
        # 6 sigma^2, as much of it below zero as above.
        self.bends: list[float] = [0.0, 0.0, 0.0]

    def spread(self) -> float:
        """The standard deviation of one evaluation's validation loss about its level, from the concave bends seen
        so far (see the class); 0 while none is known."""
        concave, n, _ = self.bends
        return math.sqrt(concave / (6 * n)) if n else 0.0

    def _bend(self, v: float) -> None:
        if len(self.previous) == 2:
            a, b = self.previous
            dd = a - 2 * b + v
            if math.isfinite(dd):
                if dd <= 0:  # a flat one (a constant or straight run) is as much one way as the other: half
                    self.bends[0] += dd * dd
                    self.bends[1] += 1.0 if dd < 0 else 0.5
                self.bends[2] += 1
        self.previous.append(v)

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        v = record.val_loss
        if not finite(v):
            return []
        s = self.sign
        v *= s
        self._bend(v)
        # The training loss as last seen finite: after a NaN it stays where it was.
        train = None if trend.latest_unbroken is None else s * trend.latest_unbroken
        if self.best is None or v < self.best - self.min_delta * abs(self.best):
            self.best, self.best_step, self.train_at_best, self.evaluations = v, record.step, train, 0
            self.train_steps_at_best = trend.latest_steps
            self.since.clear()
            self.latch.check("", False, step=record.step)
            return []
        self.since.append(v)
        self.evaluations += 1
        level = sum(self.since) / len(self.since)
        rise = level - self.best
        # The standard error of the rise: one evaluation (the best) against the mean of the recent ones.
        noise = self.spread() * math.sqrt(1 + 1 / len(self.since))
        tr, tb = train, self.train_at_best
        falling = False
        if tr is not None and tb is not None:
            # The per-step spread of the training loss from its rises (a score: its falls), against which the
            # smoothed losses then and now are compared.
            steps_now, steps_then = max(trend.latest_steps, 1), max(self.train_steps_at_best, 1)
            train_noise = trend.spread(-s) * math.sqrt(1 / steps_then + 1 / steps_now)
            falling = tb - tr > max(self.train_delta * abs(tb), self.train_noise * train_noise)
        active = (self.evaluations >= self.patience and rise > self.threshold * abs(self.best)
                  and rise > self.noise * noise and falling)
        if not self.latch.check("", active, step=record.step):
            return []
        assert tr is not None and tb is not None  # falling
        return [Fact("", values={"evaluations": self.evaluations, "val_loss": level * s, "best": self.best * s,
                                 "best_step": self.best_step, "train_at_best": tb * s, "train": tr * s,
                                 "noise": noise, "recent": len(self.since), "threshold": self.threshold,
                                 "train_delta": self.train_delta})]

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s values; a state saved before the spread was kept resumes with none known
        (learned from the evaluations to come)."""
        d = {"train_steps_at_best": 0, "previous": [], "bends": [0.0, 0.0, 0.0], **d}
        super().load_state_dict(d)

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        best_step = v["best_step"]
        recent = int(v.get("recent", 1))
        level = f"its last {recent} evaluations average" if recent > 1 else "it now sits at"
        noise = f" (its noise between evaluations: {fmt(v['noise'])})" if v.get("noise") else ""
        return (f"the validation loss has not improved for {v['evaluations']} evaluations: {level} "
                f"{fmt(v['val_loss'])}, above its best of {fmt(v['best'])} at step {best_step}{noise}, while the "
                f"training loss fell from {fmt(v['train_at_best'])} to {fmt(v['train'])}: the model memorizes the "
                "training set.",
                "add dropout (`nn.LSTM(..., dropout=0.3)` between layers, `nn.Dropout` before the "
                "head), use a smaller hidden size, weight decay "
                "(`torch.optim.AdamW(model.parameters(), weight_decay=1e-2)`), more data, or stop "
                f"early at the best validation step ({best_step}).")
