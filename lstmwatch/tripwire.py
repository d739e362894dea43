"""A NaN or Inf known to the host by the step after it appears, without waiting on the device.

Every value a step writes to a `Tape` (the loss, each probe's input and gradient sums) also goes through
`see`: one `isfinite().all()` per write, and-ed into a 0-d flag per device. At the end of the step `arm`
sends the flag to the host: on a CPU the value is there at once; on a GPU it is copied non-blocking into
pinned memory behind a CUDA event, and `poll` reads it once the event has completed, one step later or so,
never waiting. The tapes still date the first non-finite step exactly; the tripwire only says that a record
is worth making now instead of at the next logging step. It trips once: after that the run's NaN is
reported, and what follows is its consequence.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

MAX_IN_FLIGHT = 4  # flags on their way to the host at most; beyond, a step goes unflagged (its tape keeps it)


class Tripwire:
    """Whether a step's values held a NaN or Inf, learnt by the host without a sync."""

    def __init__(self) -> None:
        self._ok: dict[torch.device, Tensor] = {}  # device -> 0-d bool: this step's values all finite so far
        self._in_flight: deque[tuple[int, Tensor, torch.cuda.Event]] = deque()  # (step, pinned flag, copy done)
        self.armed = True  # False once tripped: the first non-finite step is all it is for
        self.tripped: int | None = None  # the step whose values were first seen non-finite by the host
        self._told = False

    def see(self, values: Tensor) -> None:
        """Take values written this step (any shape, on their device)."""
        if not self.armed or not values.is_floating_point():
            return
        ok = torch.isfinite(values).all()
        prev = self._ok.get(values.device)
        self._ok[values.device] = ok if prev is None else prev & ok

    def arm(self, step: int) -> None:
        """The step is over: send its flag to the host (at once from a CPU, non-blocking from a GPU)."""
        flags, self._ok = self._ok, {}
        if not self.armed:
            return
        for ok in flags.values():
            if ok.device.type == "cuda":
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    continue
                host = torch.empty((), dtype=torch.bool, pin_memory=True)
                host.copy_(ok, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(ok.device))
                self._in_flight.append((step, host, done))
            elif ok.device.type == "cpu":
                host = torch.empty((), dtype=torch.bool)
                host.copy_(ok, non_blocking=True)  # on a CPU a plain copy: the value is there now
                self._check(step, host)
            # Other devices (MPS, XLA): no event to wait on without a sync; their tapes report at logging steps.

    def poll(self) -> int | None:
        """The step whose values were non-finite, the first time the host knows it; else None."""
        while self.armed and self._in_flight and self._in_flight[0][2].query():
            step, host, _ = self._in_flight.popleft()
            self._check(step, host)
        if self.tripped is None or self._told:
            return None
        self._told = True
        return self.tripped

    def _check(self, step: int, host: Tensor) -> None:
        if self.armed and not bool(host):  # a host tensor: reading it waits on nothing
            self.armed, self.tripped = False, step
            self._in_flight.clear()
