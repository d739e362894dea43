"""The first stack frame outside lstmwatch: where warnings point, and where the training loop's variables live."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

_PKG = os.path.dirname(os.path.abspath(__file__))


def user_frame() -> tuple[FrameType | None, int]:
    """The caller's first frame outside lstmwatch, and its stacklevel as seen from the caller."""
    frame: FrameType | None = sys._getframe(2)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PKG):
        frame, level = frame.f_back, level + 1
    return frame, level


def user_stacklevel() -> int:
    """The stacklevel that points the caller's warnings.warn at the first frame outside lstmwatch."""
    return user_frame()[1]


def warn_at_user(warning: Warning) -> None:
    """Issue `warning` at the first frame outside lstmwatch, as `warnings.warn` would, but without the caller's
    once-per-line registry: a notebook cell run again, or a second run in one script, shows its warnings again
    (lstmwatch's own latches already keep a fault from repeating). Filters apply as ever."""
    frame = user_frame()[0]
    if frame is None:
        warnings.warn(warning, stacklevel=2)
        return
    g = frame.f_globals
    warnings.warn_explicit(warning, type(warning), frame.f_code.co_filename, frame.f_lineno,
                           module=g.get("__name__", "__main__"), registry=None, module_globals=g)
