"""Non-finite values: where a NaN or Inf first appeared, and at which step."""

from __future__ import annotations

from typing import ClassVar

from .. import keys
from ..events import Record, Severity
from .base import Detector, Fact
from .trend import LossTrend

_HINTS = {
    "data": ("the input batch itself holds NaN or Inf: check the data pipeline (missing values, division by zero, "
             "log(0)); `assert torch.isfinite(x).all()` before the model, or `x = torch.nan_to_num(x)`."),
    "gates": ("the LSTM's weights or state became NaN or Inf: an earlier update was too large; lower the learning "
              "rate and clip: `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`."),
    "loss": ("the loss became NaN or Inf while the LSTM's inputs were finite: check the loss for log(0) or "
             "division by zero (add an epsilon), lower the learning rate, clip gradients."),
    "grad": ("a gradient overflowed before anything else: clip gradients "
             "(`torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`) and lower the learning rate; with mixed "
             "precision pass your GradScaler: `lstmwatch.watch(model, scaler=scaler)`."),
}
_WHAT = {"data": "the input batch", "gates": "the recomputed gates and states", "loss": "the loss"}


class NonFinite(Detector):
    """NaN or Inf: names the first place it appeared (input, gates, loss, a gradient) and the step."""

    kind = "nonfinite"
    severity: ClassVar[Severity] = "error"
    _state = ("raised",)

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def _decide(self, record: Record, trend: LossTrend) -> list[Fact]:
        if self.raised:
            return []  # everything after the first non-finite value is its consequence
        # Earliest step first; within a step the order values are produced in (keys.SITES): the root.
        sites = [(step, keys.SITES.index(keys.site_of(site)), m, site) for step, m, site in record.nonfinite()]
        if not sites:
            return []
        step, _, m, site = min(sites)
        self.raised = True
        return [Fact(m, site, values={"first_step": step})]

    def _describe(self, fact: Fact) -> tuple[str, str]:
        kind = keys.site_of(fact.where)
        what = _WHAT.get(kind) or f"the gradient of {fact.where.split('/', 1)[1]}"
        where = f"{what} of {fact.module}" if fact.module else what
        return (f"a NaN or Inf first appeared in {where} at step {int(fact.values['first_step'])}; from then on "
                "training is meaningless.", _HINTS[kind])
