"""The GradScaler of mixed precision, seen when it scales a loss: wherever it lives, and only where it scales.

Under a `torch.amp.GradScaler` every gradient a backward of the scaled loss brings is multiplied by the scale
(65,536 at first), and a scaler's first steps routinely overflow to Inf, which it handles by skipping the step.
lstmwatch must know, in each hook, whether the backward running was started from a scaled loss, and by which
scaler. Users keep the scaler anywhere (a local of the loop, an attribute of a trainer object, Lightning's
precision plugin), and a process may train another model without one (a GAN's second network, a teacher, a
baseline): rather than search the user's objects, lstmwatch sees the scaler at work. While a watcher is open,
`torch.amp.GradScaler.scale` is wrapped on the class (subclasses such as `torch.cuda.amp.GradScaler` inherit it,
and an override that calls `super().scale` still passes through), and the scaled loss it returns gets a hook
that runs first in that loss's backward: it makes the scaler the backward's (`active()`) until autograd's final
callback of the same backward. A backward of an unscaled loss, in the same process or the same step, has no
active scaler. The original method comes back when the last watcher closes, or at the next `scale()` once every
watcher is gone.
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
_ACTIVE: Any = None  # the scaler of the backward running now, if it started from a loss one scaled


def _scaler_class() -> Any:
    amp = getattr(torch, "amp", None)
    return getattr(amp, "GradScaler", None)


def active() -> Any:
    """The GradScaler whose scaled loss the running backward started from, or None."""
    return _ACTIVE


def _entered(scaler: Any, grad: torch.Tensor) -> None:
    """The first hook of a scaled loss's backward: its scaler is the backward's until the backward ends."""
    global _ACTIVE
    _ACTIVE = scaler
    try:
        torch.autograd.Variable._execution_engine.queue_callback(_left)
    except RuntimeError:  # not inside a backward (called by hand): nothing to end
        _ACTIVE = None


def _left() -> None:
    global _ACTIVE
    _ACTIVE = None


def _mark(outputs: Any, scaler: Any) -> None:
    """Hook every scaled tensor of `scale()`'s result (a tensor or nested lists and tuples of them)."""
    if isinstance(outputs, torch.Tensor):
        if outputs.requires_grad:
            outputs.register_hook(functools.partial(_entered, scaler))
    elif isinstance(outputs, (list, tuple)):
        for o in outputs:
            _mark(o, scaler)


def _wrap(original: Any) -> Any:
    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        out = original(self, outputs)
        if not _CLOCKS:  # every watcher gone without close(): put torch's method back
            _restore()
        elif self.is_enabled():
            _mark(out, self)
        return out

    scale.__lstmwatch__ = True  # type: ignore[attr-defined]
    return scale


def follow(clock: Clock) -> None:
    """Keep GradScaler.scale wrapped for `clock`, until `unfollow(clock)`: its hooks then read `active()`."""
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
    with _LOCK:
        _CLOCKS.discard(clock)
        if not _CLOCKS:
            _restore()


def _restore() -> None:
    """GradScaler.scale as torch defines it (not if someone wrapped it after lstmwatch). Under _LOCK or alone."""
    global _ORIGINAL
    cls = _scaler_class()
    if _ORIGINAL is None or cls is None:
        return
    if getattr(cls.__dict__.get("scale"), "__lstmwatch__", False):
        cls.scale = _ORIGINAL
        _ORIGINAL = None
