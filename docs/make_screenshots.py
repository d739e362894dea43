"""Regenerate docs/report.png and docs/notebook.png: the demo's deep_long run, as its report and as the HTML a
notebook cell shows for it, screenshotted by a headless Chromium (`apt-get install chromium`).

    python docs/make_screenshots.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lstmwatch

DOCS = Path(__file__).resolve().parent
CELL = """<!doctype html><html><head><meta charset="utf-8"><style>
body{{font-family:system-ui,sans-serif;background:#fff;margin:0;padding:16px;width:1000px}}
.cell{{border:1px solid #ddd;border-radius:4px}} .in{{background:#f7f7f7;font-family:monospace;padding:8px 12px;
border-bottom:1px solid #ddd}} .in span{{color:#303f9f}} .out{{padding:8px 12px}}
</style></head><body><div class="cell"><div class="in"><span>[3]:</span> run = lstmwatch.load("deep_long.jsonl")
<br>&nbsp;&nbsp;&nbsp;&nbsp; run</div><div class="out">{fragment}</div></div></body></html>"""


def shoot(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    """A headless screenshot of `page`, `width` x `height` CSS pixels."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no headless Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        subprocess.run([sys.executable, "-m", "lstmwatch", "demo", "--out", str(out)], check=True, timeout=600,
                       capture_output=True)
        run = lstmwatch.load(out / "deep_long.jsonl")
        cell = Path(tmp) / "cell.html"
        cell.write_text(CELL.format(fragment=run._repr_html_()), encoding="utf-8")
        shoot(browser, out / "deep_long.html", DOCS / "report.png", 1100, 2330)
        shoot(browser, cell, DOCS / "notebook.png", 1040, 1700)
    print(f"wrote {DOCS / 'report.png'} and {DOCS / 'notebook.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
