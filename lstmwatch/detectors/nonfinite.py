"""Non-finite values: where a NaN or Inf first appeared, and at which step."""

from __future__ import annotations

from collections.abc import Iterable

from ..events import Event, Record
from .base import Detector

# Within one step, values are produced in this order: the earliest site is the root.
_ORDER = ("data", "gates", "loss", "grad")

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


class NonFinite(Detector):
    """NaN or Inf: names the first place it appeared (input, gates, loss, a gradient) and the step."""

    kind = "nonfinite"
    severity = "error"

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def _check(self, record: Record) -> Iterable[Event]:
        if self.raised:
            return  # everything after the first non-finite value is its consequence
        sites = []
        for k, step in record.stats.items():
            if k == "nonfinite_loss":
                sites.append((step, _ORDER.index("loss"), "", "loss", "the loss"))
            elif "/nonfinite/" in k:
                m, site = k.split("/nonfinite/")
                kind = site.split("/")[0]
                what = {"data": "the input batch", "gates": "the recomputed gates and states"}.get(
                    kind, f"the gradient of {site[5:]}")
                sites.append((step, _ORDER.index(kind), m, kind, what))
        if not sites:
            return
        step, _, m, kind, what = min(sites)
        self.raised = True
        where = f"{what} of {m}" if m else what
        yield self.event(record, m, f"a NaN or Inf first appeared in {where} at step {int(step)}; from then on "
                         "training is meaningless.", _HINTS[kind])
