"""Gradient faults: exploding, vanishing, absent, and gradients that never reach the weights."""

from __future__ import annotations

import math
from collections import deque
from statistics import median

from .. import keys
from ..events import Record
from .base import Detector, Fact, finite, fmt, times
from .saturation import KnowsType
from .trend import LossTrend

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
    harmless_update: a jump that comes with a rising loss is an explosion only when its step moved the weights
    by at least this much of their norm (a healthy step is about 1e-3): a gradient of 1e-3 after a level of 5e-5,
    as saturated gates make them, moves nothing, whatever the jump relative to the tiny level.
    A fault raised again when clearly worse is judged by how far the step moved the weights (its update ratio).
    """

    kind = "exploding_gradient"
    _state = ("history", "prev_loss", "best_loss")

    def __init__(self, threshold: float = 10.0, window: int = 10, min_update_ratio: float = 0.1,
                 max_update_ratio: float = 1.0, through_time: float = 100.0, harmless_update: float = 1e-3):
        super().__init__()
        self.threshold, self.min_update_ratio, self.harmless_update = threshold, min_update_ratio, harmless_update
        self.max_update_ratio, self.through_time = max_update_ratio, through_time
        self.history: deque[float] = deque(maxlen=window)  # the global gradient norm of the latest records
        self.prev_loss: float | None = None
        self.best_loss: float | None = None

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        g, loss = record.get(keys.GRAD_NORM), record.get(keys.LOSS_MEAN)
        ratio = record.max_update_ratio()
        found: list[tuple[Fact, float]] = []  # (fact, badness), several per module possible: the first counts
        if finite(g) and len(self.history) >= 2:
            level = median(self.history)
            # The loss jumped too, well above where it was: noise between records does not count.
            rose = (finite(loss) and self.prev_loss is not None and self.best_loss is not None
                    and loss > 1.5 * self.prev_loss and loss > 2 * self.best_loss)
            moved = ratio is None or ratio >= self.harmless_update  # unmeasured: the loss alone decides
            if level > 0 and g > self.threshold * level and ((rose and moved) or (ratio or 0) > self.min_update_ratio):
                biggest = (max(record.modules, key=lambda m: record.module_stat(m, "grad_norm") or 0)
                           if record.modules else "")
                values = {"grad_norm": g, "level": level, "threshold": self.threshold, "loss_rose": float(rose)}
                if ratio is not None:
                    values["update_ratio"] = ratio
                found.append((Fact(biggest, variant="jump", values=values), g / level if ratio is None else ratio))
        if ratio is not None and ratio > self.max_update_ratio:
            m = max(record.modules, key=lambda m: record.max_update_ratio(m) or 0)
            # The layer-direction that moved most.
            where = max(record.layers(m, "update_ratio"), key=lambda lab: record.layer_stat(m, lab, "update_ratio")
                        or 0, default="")
            found.append((Fact(m, where, "update", {"update_ratio": ratio, "threshold": self.max_update_ratio}),
                          ratio))
        for m in record.modules:
            r = record.get(keys.gtt_key(m, stat="gain"))
            if finite(r) and r > self.through_time:
                found.append((Fact(m, variant="gain", values={"gain": r, "threshold": self.through_time}), r))
        if finite(g) and g > 0:
            self.history.append(g)
        if finite(loss):
            self.prev_loss = loss
            self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        out: list[Fact] = []
        seen: set[str] = set()
        for fact, bad in found:
            if fact.module in seen:
                continue
            seen.add(fact.module)
            if self.latch.check(fact.module, True, bad, step=record.step):
                out.append(fact)
        for m in set(record.modules) - seen:
            self.latch.check(m, False, step=record.step)
        return out

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        if fact.variant == "jump":
            g, level = v["grad_norm"], v["level"]
            what = (f"the gradient norm jumped to {fmt(g)}, {times(g / level, 0)}x its running level of {fmt(level)} "
                    f"(threshold {v['threshold']:g}x), and the step "
                    + ("raised the loss" if v["loss_rose"] else f"moved the weights by {fmt(v['update_ratio'])} of "
                       "their norm"))
        elif fact.variant == "update":
            what = (f"one optimizer step changed the weights by {fmt(v['update_ratio'])} times their norm "
                    f"(threshold {v['threshold']:g}; healthy is about 1e-3)")
        else:
            what = (f"the gradient grows back through time: dL/dh at the first step is {fmt(v['gain'])}x "
                    f"all the gradient the loss put in along the sequence (threshold {v['threshold']:g}x; healthy "
                    "is at most about 1)")
        return (f"{what}. The updates are too large for the weights: training oscillates or diverges.",
                CLIP_HINT + "; for long sequences also consider truncated backpropagation through time.")


class VanishingGradient(KnowsType, Detector):
    """The first layers, or the earliest timesteps while the loss stalls, get vanishingly little gradient.

    threshold: first-layer over last-layer gradient norm below which a stack starves its first layers,
    for `patience` consecutive records. through_time: dL/dh at the first step over the last, below which
    the early steps get nothing; judged only together with a loss that has not improved by `min_delta`
    after `loss_patience` steps while the weights move by at least `min_update` of their norm per step
    (a stall with tiny updates is the learning rate's), because healthy forecasters also have tiny ratios.
    dead: a ratio below this (the first steps get nothing a float sum could keep; healthy forecasters stay
    above 1e-13) needs no long stall: from step `dead_steps` on, a loss still within `min_delta` of its first
    steps' level on two records in a row is enough. Without it, a deep stack on long sequences whose loss
    falls a little on a faint late cue was named only after `loss_patience` steps, half of a short run.
    """

    kind = "vanishing_gradient"
    needs_trend = True
    _state = ("updates",)

    def __init__(self, threshold: float = 1e-2, through_time: float = 1e-6, patience: int = 3,
                 loss_patience: int = 100, min_delta: float = 0.05, min_update: float = 1e-4,
                 dead: float = 1e-20, dead_steps: int = 8):
        super().__init__()
        self.min_update, self.dead, self.dead_steps = min_update, dead, dead_steps
        self.updates: dict[str, float] = {}  # module -> its latest measured update ratio
        self.threshold, self.through_time, self.patience = threshold, through_time, patience
        self.loss_patience, self.min_delta = loss_patience, min_delta

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        m = module
        self.note_type(record, m)
        norms = record.layer_norms(m)
        fact, bad, present = None, 0.0, False
        if len(norms) >= 2:
            first, last = norms[min(norms)], norms[max(norms)]
            ratio = first / last if last > 0 else None
            starved = ratio is not None and ratio < self.threshold
            present |= starved
            n = self.streak.update(m + "/layers", starved, record.step)
            if ratio is not None and n >= self.patience:
                fact = Fact(m, keys.layer_label(min(norms)), "layers",
                            {"ratio": ratio, "first": first, "last": last, "last_layer": max(norms),
                             "threshold": self.threshold, "records": n})
                bad = 1 / max(ratio, 1e-30)
        r = record.get(keys.gtt_key(m, stat="ratio"))
        u = record.max_update_ratio(m)
        if u is not None:
            self.updates[m] = u
        # A stall with tiny updates is the learning rate's fault, not the gradient's path through time.
        moving = self.updates.get(m, 0.0) >= self.min_update
        stalled = trend.stalled(self.loss_patience, self.min_delta) and not trend.diverged()
        no_memory = stalled and moving and finite(r) and r < self.through_time
        # The smoothed trend cannot say "stalled" before loss_patience steps; against the first steps' level
        # the latest record's loss can, for a ratio no healthy run comes near.
        early = self._early_improvement(record, trend)
        dead = (not no_memory and moving and finite(r) and r < self.dead and record.step >= self.dead_steps
                and early is not None and -0.5 < early < self.min_delta)
        present |= no_memory or dead
        if fact is None and self.streak.update(m + "/time", no_memory or dead, record.step) >= 2 and finite(r):
            imp = trend.improvement() if no_memory else early
            fact = Fact(m, variant="time", values={"ratio": r, "threshold": self.through_time,
                                                   "improvement": imp or 0.0, "steps": record.step})
            bad = 1 / max(r, 1e-30)
        return fact if self.latch.check(m, fact is not None, bad, present, record.step) else None

    @staticmethod
    def _early_improvement(record: Record, trend: LossTrend) -> float | None:
        """The record's mean loss against the first two steps' (0.1 = 10% lower); None when either is missing."""
        loss, start = record.get(keys.LOSS_MEAN), trend.level0(2)
        if not finite(loss) or start is None or not math.isfinite(start) or trend.broken:
            return None
        return (start - loss) / max(abs(start), 1e-12)

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        if fact.variant == "layers":
            what = (f"layer 0 gets {fmt(v['ratio'])} of the gradient of layer {v['last_layer']} ({fmt(v['first'])} "
                    f"against {fmt(v['last'])}; threshold {v['threshold']:g}) for {v['records']} logging steps: the "
                    "first layers of the stack barely learn")
        else:
            imp = v["improvement"]
            loss = (f"improved only {100 * imp:.1f}%" if imp >= 0.0005 else "has not improved")
            what = (f"dL/dh at the first timestep is {fmt(v['ratio'])} of that at the last (threshold "
                    f"{v['threshold']:g}) while the loss {loss} in {v['steps']} steps: the early timesteps get no "
                    "gradient, so what they hold cannot be learned")
        if self.gru(fact.module):  # a GRU has no forget gate: its update gate z carries the state
            return (what + ".", "use fewer layers or residual connections between them, shorter sequences or "
                    "truncated backpropagation through time, and a positive update-gate bias (the second third of "
                    "`bias_hh`), so the state is carried across steps.")
        return (what + ".", "use fewer layers or residual connections between them, shorter sequences or "
                "truncated backpropagation through time, and a forget-gate bias of 1.0: "
                "`lstmwatch.remedies.set_forget_bias(model, 1.0)`.")


class NoGradient(KnowsType, Detector):
    """An LSTM gets no gradient at all, or an exactly zero one, for `patience` consecutive records.

    An exactly zero gradient counts only while the LSTM has had no other in this run: one that had a gradient
    has a path from the loss, and a zero now is a gradient that underflowed (saturated gates make it 0 on some
    batches and 1e-9 on others), gate_saturation's and vanishing_gradient's finding, not a missing path.
    """

    kind = "no_gradient"
    _state = ("reached",)

    def __init__(self, patience: int = 2):
        super().__init__()
        self.patience = patience
        self.reached: dict[str, int] = {}  # module -> the first step a nonzero gradient reached it

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        self.note_type(record, module)
        g, seen = record.module_stat(module, "grad_norm"), record.module_stat(module, "grads_seen")
        if g is not None and g > 0:  # NaN (a step the GradScaler skipped) says nothing
            self.reached.setdefault(module, record.step)
        zero = g == 0 and module not in self.reached
        n = self.persists(module, seen == 0 or zero, record.step, self.patience)
        if not n:
            return None
        values = {"records": n, **{k: x for k, x in (("grads_seen", seen), ("grad_norm", g)) if x is not None}}
        if record.module_stat(module, "trainable") == 0:  # an observation, not a fault
            return Fact(module, variant="frozen", values=values, severity="info")
        return Fact(module, variant="none" if seen == 0 else "zero", values=values)

    def _describe(self, fact: Fact) -> tuple[str, str]:
        name = "GRU" if self.gru(fact.module) else "LSTM"
        if fact.variant == "frozen":
            return (f"every parameter of this {name} has requires_grad=False: it is frozen and will not learn.",
                    f"if that is not intended: `{name.lower()}.requires_grad_(True)`.")
        how = "no gradient reached its parameters" if fact.variant == "none" else "its gradient is exactly zero"
        return (f"for {fact.values['records']} logging steps {how}: nothing the loss depends on passes "
                f"through this {name}, so it cannot learn.",
                "make sure its output reaches the loss without `.detach()`, `.item()`, "
                "`.numpy()` or `torch.no_grad()` in between, and that the output you use is not "
                "replaced by something else (e.g. the input).")


class NotUpdated(Detector):
    """An LSTM gets gradients but its weights do not change, for `patience` consecutive records.

    resolution: an update smaller than this fraction of the weights may round away in float32 (whose
    resolution is about 1.2e-7 of a value): once the weights have moved in this run, a step with no change
    whose gradient predicts a step below it (from the update per unit of gradient seen when they last moved)
    is the learning rate's or the gradient's smallness, for stalled_loss and vanishing_gradient to judge.
    """

    kind = "not_updated"
    _state = ("step_per_grad",)

    def __init__(self, patience: int = 2, resolution: float = 1e-6):
        super().__init__()
        self.patience, self.resolution = patience, resolution
        self.step_per_grad: dict[str, float] = {}  # module -> update ratio / gradient norm when it last moved

    def _decide_module(self, record: Record, trend: LossTrend, module: str) -> Fact | None:
        g, ratio = record.module_stat(module, "grad_norm"), record.max_update_ratio(module)
        if ratio is None or not finite(g):
            return None  # this record did not measure it (or the step was skipped by the GradScaler)
        if ratio > 0 and g > 0 and finite(per := ratio / g):
            self.step_per_grad[module] = per
        # The optimizer did apply the step, but lr * grad is below float32's resolution of the weights.
        rounded = self.step_per_grad.get(module, math.inf) * g < self.resolution
        if n := self.persists(module, g > 0 and ratio == 0 and not rounded, record.step, self.patience):
            return Fact(module, values={"grad_norm": g, "update_ratio": ratio, "records": n})
        return None

    def _describe(self, fact: Fact) -> tuple[str, str]:
        v = fact.values
        return (f"it gets gradients (norm {fmt(v['grad_norm'])}) but its weights did not change at all on "
                f"{v['records']} logging steps: the optimizer does not update it.",
                "build the optimizer from all parameters after the model is complete, "
                "`opt = torch.optim.Adam(model.parameters(), lr=1e-3)`; check that the "
                "learning rate is above 0; call `watcher.step(loss)` after `opt.step()`.")
