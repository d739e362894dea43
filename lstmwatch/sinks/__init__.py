"""Sinks receive records and events: write(record), emit(event), close(); each has one destination."""

from __future__ import annotations

from typing import Any

from .console import ConsoleSink

__all__ = ["ConsoleSink", "make_sinks"]


def make_sinks(console: bool = True, sinks: list[Any] | None = None, **options: Any) -> list[Any]:
    """The sinks a watch() call asked for."""
    out: list[Any] = [ConsoleSink()] if console else []
    if options:
        raise TypeError(f"watch() got unexpected keyword argument(s): {', '.join(sorted(options))}")
    return out + list(sinks or [])
