"""Values seen once per step (the loss, a probe's NaN/Inf sums), written to the device and reduced in batches.

What happens on every step has to be cheap, and on a CPU each tensor operation costs microseconds whatever
its size. A `Tape` takes one write per step into a slot of a small device buffer; the sum, the count, the last
value and the first non-finite step come from the whole buffer in a few operations when a record needs them,
when the buffer is full, or when a step is skipped. Keeping them current instead cost six operations per value
per step. Values are copied at once: a loss tensor the user reuses, or one a CUDA graph overwrites on its next
replay, cannot change what was recorded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tripwire import Tripwire

SLOTS = 64  # steps buffered between reductions


class Tape:
    """Per-step values of a fixed shape (0-d, or (sites,)): their sum and count since `restart()`, the last
    value, and per entry the first step it was NaN or Inf (+inf while never)."""

    def __init__(self, trip: Tripwire | None = None) -> None:
        self.trip = trip  # told of every value written, to learn of a NaN before the next record
        self._buf: Tensor | None = None  # (SLOTS, *shape) in the values' dtype, on their device
        self._first = 0  # the step of slot 0: slot k holds step _first + k (a gap folds first)
        self._k = 0  # slots filled
        self._arange: Tensor | None = None  # (SLOTS,) 0..SLOTS-1 in float32, on the buffer's device
        self.sum: Tensor | None = None  # (*shape): the values folded since restart()
        self.n = 0  # how many steps
        self.last: Tensor | None = None  # (*shape): the latest value folded
        self.first_bad: Tensor | None = None  # (*shape) float32: the first step each entry was NaN or Inf

    def add(self, values: Tensor, step: int) -> None:
        """Record a step's values (detached; the same shape every step)."""
        buf, k = self._buf, self._k
        if buf is None or values.dtype != buf.dtype or values.device != buf.device \
                or values.shape != buf.shape[1:] or k == SLOTS or (k and step != self._first + k):
            self.fold()
            k = 0
            if buf is None or values.dtype != buf.dtype or values.device != buf.device \
                    or values.shape != buf.shape[1:]:
                buf = self._buf = values.new_empty((SLOTS, *values.shape))
                self._arange = torch.arange(SLOTS, dtype=torch.float32, device=values.device)
        if not k:
            self._first = step
        if self.trip is not None:
            self.trip.see(values)
        buf[k] = values
        self._k = k + 1

    def fold(self) -> None:
        """Reduce the buffered values into sum, n, last and first_bad; empty the buffer."""
        k = self._k
        if not k or self._buf is None or self._arange is None:
            return
        self._k = 0
        vals = self._buf[:k]  # (k, *shape)
        at = (self._arange[:k] + self._first).view(k, *[1] * (vals.dim() - 1))  # the slots' steps, no transfer
        bad = torch.where(torch.isfinite(vals), math.inf, at).amin(0)
        total = vals.sum(0)
        if self.first_bad is None or self.first_bad.shape != bad.shape:
            self.first_bad = bad
        else:
            self.first_bad = torch.minimum(self.first_bad, bad.to(self.first_bad.device))
        self.sum = total if self.sum is None or self.sum.shape != total.shape else self.sum + total.to(self.sum.device)
        self.n += k
        self.last = vals[k - 1].clone()

    def restart(self) -> None:
        """Start the next interval's sum and count (after a record); the first non-finite steps are kept."""
        self.sum, self.n = None, 0

    def state(self) -> dict[str, float | int | None]:
        """A 0-d tape's sum, n and first_nonfinite as plain numbers (reads the device: checkpoints only)."""
        self.fold()
        return {"sum": float(self.sum) if self.sum is not None else None, "n": self.n,
                "first_nonfinite": float(self.first_bad) if self.first_bad is not None else None}

    def load(self, state: dict[str, float | int | None]) -> None:
        """Continue a 0-d tape from `state()`."""
        self.__init__(self.trip)  # type: ignore[misc]
        total, n, bad = state.get("sum"), int(state.get("n") or 0), state.get("first_nonfinite")
        self.sum = torch.tensor(total) if total is not None else None
        self.n = n
        self.first_bad = torch.tensor(bad) if bad is not None else None
        self.last = self.sum / n if self.sum is not None and n else None
