"""The GradScaler of mixed precision, seen when it scales a loss: wherever it lives.

Under a `torch.amp.GradScaler` every gradient the hooks see is multiplied by the scale (65,536 at first), and
a scaler's first steps routinely overflow to Inf, which it handles by skipping the step. lstmwatch must know
the scaler before the backward pass its hooks watch. Users keep it anywhere: a local of the loop, an attribute
of a trainer object, Lightning's precision plugin, another library's wrapper. Rather than search the user's
objects for it, lstmwatch sees it at work: while a watcher is open, `torch.amp.GradScaler.scale` is wrapped on
the class (subclasses such as `torch.cuda.amp.GradScaler` inherit it, and an override that calls
`super().scale` still passes through), and the scaler that scales a loss becomes the scaler of every open
watcher that was not given one. `scale()` runs before `backward()`, so the hooks know it from the first step.
The original method comes back when the last watcher closes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch

from .schedule import Clock

_LOCK = threading.Lock()
_CLOCKS: weakref.WeakSet[Clock] = weakref.WeakSet()  # clocks of open watchers that look for their scaler
_ORIGINAL: Any = None  # GradScaler.scale as torch defines it, while it is wrapped


def _scaler_class() -> Any:
    amp = getattr(torch, "amp", None)
    return getattr(amp, "GradScaler", None)


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        if self.is_enabled():
            for clock in list(_CLOCKS):
                clock.scaler = self
        return original(self, outputs)

    scale.__lstmwatch__ = True  # type: ignore[attr-defined]
    return scale


def follow(clock: Clock) -> None:
    """Give `clock` the scaler of every loss scaled from now on, until `unfollow(clock)`."""
    global _ORIGINAL
    cls = _scaler_class()
    if cls is None:
        return
    with _LOCK:
        _CLOCKS.add(clock)
        if _ORIGINAL is None:
            _ORIGINAL = cls.__dict__["scale"]
            cls.scale = _wrap(_ORIGINAL)


def unfollow(clock: Clock) -> None:
    """Stop following for `clock`; the last one out restores GradScaler.scale. Safe twice."""
    global _ORIGINAL
    cls = _scaler_class()
    with _LOCK:
        _CLOCKS.discard(clock)
        if _CLOCKS or _ORIGINAL is None or cls is None:
            return
        if getattr(cls.__dict__.get("scale"), "__lstmwatch__", False):  # not if someone wrapped it after us
            cls.scale = _ORIGINAL
            _ORIGINAL = None
