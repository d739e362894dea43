"""Golden output: the exact block the console prints for each kind of finding.

The records are synthetic and deterministic (tests/test_detectors.py's planted faults), so the text is
stable across machines. After a deliberate change of wording, regenerate with
`LSTMWATCH_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and read the diff before committing it.
"""

import os
from pathlib import Path

import pytest
from test_detectors import FAULTS, feed, rec

import lstmwatch
from lstmwatch.detectors import NonFinite
from lstmwatch.events import WARNINGS, warning_for

GOLDEN = Path(__file__).parent / "golden" / "console.txt"


def _first_event(kind: str) -> lstmwatch.Event:
    if kind == "nonfinite":
        records = [rec(1), rec(2), rec(4, over={"lstm/nonfinite/data": 3.0, "nonfinite_loss": 3.0})]
        return feed(NonFinite(), records)[0]
    return FAULTS[kind].play("bbbbbb")[0]


def _blocks() -> dict[str, str]:
    out = {}
    for kind in sorted(WARNINGS):
        w = warning_for(_first_event(kind))
        out[kind] = f"{type(w).__name__}: {w}"
    return out


def _read() -> dict[str, str]:
    text = GOLDEN.read_text()
    parts = text.split("\n=== ")
    parts[0] = parts[0].removeprefix("=== ")
    return {p.split(" ===\n", 1)[0]: p.split(" ===\n", 1)[1].rstrip("\n") for p in parts}


def test_every_kind_has_a_golden_block():
    if os.environ.get("LSTMWATCH_UPDATE_GOLDEN"):
        GOLDEN.write_text("\n".join(f"=== {k} ===\n{v}\n" for k, v in _blocks().items()))
    assert set(_read()) == set(WARNINGS)


@pytest.mark.parametrize("kind", sorted(WARNINGS))
def test_console_block_is_exactly_the_golden_text(kind):
    assert _blocks()[kind] == _read()[kind]
