"""Gradient faults: exploding, vanishing, absent, and gradients that never reach the weights."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from statistics import median

from ..events import Event, Record
from .base import Detector, LossTrend, finite, fmt, layer_norms, max_update_ratio

CLIP_HINT = ("clip the gradient norm before the optimizer step, "
             "`torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)`, "
             "and lower the learning rate (e.g. 10x)")


class ExplodingGradient(Detector):
    """Gradient norms far above the run's own level, a step larger than the weights, or growth back through time.

    threshold: a jump of the global gradient norm over the median of the last `window` records that counts,
    when the same step also moved the weights by more than `min_update_ratio` of their norm or raised the loss.
    max_update_ratio: an optimizer step this large relative to the weights is an explosion on its own.
    through_time: dL/dh at the first step of the top layer over all the gradient the loss put in along the
    sequence (for a loss on the last step: over dL/dh at the last); healthy LSTMs stay at about 1 or below.
    """

    kind = "exploding_gradient"

    def __init__(self, threshold: float = 10.0, window: int = 10, min_update_ratio: float = 0.1,
                 max_update_ratio: float = 1.0, through_time: float = 100.0):
        super().__init__()
        self.threshold, self.min_update_ratio = threshold, min_update_ratio
        self.max_update_ratio, self.through_time = max_update_ratio, through_time
        self.history: deque[float] = deque(maxlen=window)
        self.prev_loss: float | None = None
        self.best_loss: float | None = None

    def _check(self, record: Record) -> Iterable[Event]:
        s = record.stats
        g, loss = s.get("grad_norm"), s.get("loss_mean")
        ratio = max_update_ratio(record)
        biggest = max(record.modules, key=lambda m: s.get(f"{m}/grad_norm", 0) or 0) if record.modules else ""
        found: list[tuple[str, str, float]] = []  # (module, what, badness)
        if finite(g) and len(self.history) >= 2:
            level = median(self.history)
            # The loss jumped too, well above where it was: noise between records does not count.
            rose = (finite(loss) and self.prev_loss is not None and self.best_loss is not None
                    and loss > 1.5 * self.prev_loss and loss > 2 * self.best_loss)
            if level > 0 and g > self.threshold * level and (rose or (ratio or 0) > self.min_update_ratio):
                found.append((biggest, f"the gradient norm jumped to {fmt(g)}, {g / level:.0f}x its running level "
                              f"of {fmt(level)} (threshold {self.threshold:g}x), and the step "
                              + ("raised the loss" if rose else f"moved the weights by {fmt(ratio)} of their norm"),
                              g / level))
        if ratio is not None and ratio > self.max_update_ratio:
            m = max(record.modules, key=lambda m: max_update_ratio(record, m) or 0)
            found.append((m, f"one optimizer step changed the weights by {fmt(ratio)} times their norm "
                          f"(threshold {self.max_update_ratio:g}; healthy is about 1e-3)", ratio))
        for m in record.modules:
            r = s.get(f"{m}/gtt/gain")
            if finite(r) and r > self.through_time:
                found.append((m, f"the gradient grows back through time: dL/dh at the first step is {fmt(r)}x "
                              f"all the gradient the loss put in along the sequence (threshold "
                              f"{self.through_time:g}x; healthy is at most about 1)", r))
        if finite(g) and g > 0:
            self.history.append(g)
        if finite(loss):
            self.prev_loss = loss
            self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        seen = set()
        for m, what, bad in found:
            if m in seen:
                continue
            seen.add(m)
            if self.latch.check(m, True, bad):
                yield self.event(record, m, f"{what}. The updates are too large for the weights: training "
                                 "oscillates or diverges.", CLIP_HINT + "; for long sequences also consider truncated "
                                 "backpropagation through time.")
        for m in set(record.modules) - seen:
            self.latch.check(m, False)


class VanishingGradient(Detector):
    """The first layers, or the earliest timesteps while the loss stalls, get vanishingly little gradient.

    threshold: first-layer over last-layer gradient norm below which a stack starves its first layers,
    for `patience` consecutive records. through_time: dL/dh at the first step over the last, below which
    the early steps get nothing; judged only together with a loss that has not improved by `min_delta`
    after `loss_patience` steps while the weights move by at least `min_update` of their norm per step
    (a stall with tiny updates is the learning rate's), because healthy forecasters also have tiny ratios.
    """

    kind = "vanishing_gradient"

    def __init__(self, threshold: float = 1e-2, through_time: float = 1e-6, patience: int = 3,
                 loss_patience: int = 100, min_delta: float = 0.05, min_update: float = 1e-4):
        super().__init__()
        self.min_update = min_update
        self.updates: dict[str, float] = {}
        self.threshold, self.through_time, self.patience = threshold, through_time, patience
        self.loss_patience, self.min_delta = loss_patience, min_delta
        self.trend = LossTrend()

    def _check(self, record: Record) -> Iterable[Event]:
        self.trend.update(record)
        stalled = self.trend.stalled(self.loss_patience, self.min_delta)
        for m in record.modules:
            norms = layer_norms(record, m)
            what, bad, present = None, 0.0, False
            if len(norms) >= 2:
                first, last = norms[min(norms)], norms[max(norms)]
                ratio = first / last if last > 0 else None
                starved = ratio is not None and ratio < self.threshold
                present |= starved
                n = self.streak.update(m + "/layers", starved, record.step)
                if ratio is not None and n >= self.patience:
                    what = (f"layer 0 gets {fmt(ratio)} of the gradient of layer {max(norms)} "
                            f"({fmt(first)} against {fmt(last)}; threshold {self.threshold:g}) for "
                            f"{n} logging steps: the first layers of the stack barely learn")
                    bad = 1 / max(ratio, 1e-30)
            r = record.stats.get(f"{m}/gtt/ratio")
            u = max_update_ratio(record, m)
            if u is not None:
                self.updates[m] = u
            # A stall with tiny updates is the learning rate's fault, not the gradient's path through time.
            moving = self.updates.get(m, 0.0) >= self.min_update
            no_memory = stalled and moving and finite(r) and r < self.through_time
            present |= no_memory
            if what is None and self.streak.update(m + "/time", no_memory, record.step) >= 2:
                imp = self.trend.improvement() or 0.0
                what = (f"dL/dh at the first timestep is {fmt(r)} of that at the last (threshold "
                        f"{self.through_time:g}) while the loss improved only {100 * imp:.1f}% in {self.trend.step} "
                        "steps: the early timesteps get no gradient, so what they hold cannot be learned")
                bad = 1 / max(r, 1e-30)
            if self.latch.check(m, what is not None, bad, present) and what:
                yield self.event(record, m, what + ".",
                                 "use fewer layers or residual connections between them, shorter sequences or "
                                 "truncated backpropagation through time, and a forget-gate bias of 1.0: "
                                 "`lstmwatch.remedies.set_forget_bias(model, 1.0)`.")


class NoGradient(Detector):
    """An LSTM gets no gradient at all, or an exactly zero one, for `patience` consecutive records."""

    kind = "no_gradient"

    def __init__(self, patience: int = 2):
        super().__init__()
        self.patience = patience

    def _check(self, record: Record) -> Iterable[Event]:
        for m in record.modules:
            s = record.of(m)
            g, seen, trainable = s.get("grad_norm"), s.get("grads_seen"), s.get("trainable", 1.0)
            if n := self.persists(m, seen == 0 or g == 0, record.step, self.patience):
                if trainable == 0:
                    yield self.event(record, m, "every parameter of this LSTM has requires_grad=False: it is frozen "
                                     "and will not learn.", "if that is not intended: `lstm.requires_grad_(True)`.",
                                     severity="info")
                    continue
                how = "no gradient reached its parameters" if seen == 0 else "its gradient is exactly zero"
                yield self.event(record, m, f"for {n} logging steps {how}: nothing the loss depends on passes "
                                 "through this LSTM, so it cannot learn.",
                                 "make sure its output reaches the loss without `.detach()`, `.item()`, "
                                 "`.numpy()` or `torch.no_grad()` in between, and that the output you use is not "
                                 "replaced by something else (e.g. the input).")


class NotUpdated(Detector):
    """An LSTM gets gradients but its weights do not change, for `patience` consecutive records."""

    kind = "not_updated"

    def __init__(self, patience: int = 2):
        super().__init__()
        self.patience = patience

    def _check(self, record: Record) -> Iterable[Event]:
        for m in record.modules:
            g, ratio = record.stats.get(f"{m}/grad_norm"), max_update_ratio(record, m)
            if ratio is None or not finite(g):
                continue  # this record did not measure it (or the step was skipped by the GradScaler)
            if n := self.persists(m, g > 0 and ratio == 0, record.step, self.patience):
                yield self.event(record, m, f"it gets gradients (norm {fmt(g)}) but its weights did not change "
                                 f"at all on {n} logging steps: the optimizer does not update it.",
                                 "build the optimizer from all parameters after the model is complete, "
                                 "`opt = torch.optim.Adam(model.parameters(), lr=1e-3)`; check that the "
                                 "learning rate is above 0; call `watcher.step(loss)` after `opt.step()`.")
