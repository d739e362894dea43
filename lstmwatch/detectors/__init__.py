"""Detectors: plain objects whose update(record) returns events. They never act by themselves."""

from __future__ import annotations


def default_detectors() -> list:
    """The default set of detectors."""
    return []
