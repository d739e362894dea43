"""The report: one self-contained HTML file, the diagnosis first, then the plots, the events and the LSTMs.

Nothing in it is loaded from the network: the CSS is inline and the figure is a base64 PNG. Every
string that comes from the model or the run goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import os
import re
from typing import Any

from ..diagnose import Finding, diagnose, summary
from ..events import Event
from ..run import Run
from .source import as_run

MAX_EVENT_ROWS = 300
_CODE = re.compile(r"`([^`]+)`")
_CONFIG_ORDER = ("type", "input_size", "hidden_size", "num_layers", "bidirectional", "batch_first", "dropout",
                 "proj_size", "bias", "parameters")


def esc(x: Any) -> str:
    """Text from the model or the run, safe to put anywhere in the page."""
    return html.escape(str(x), quote=True)


def prose(x: Any) -> str:
    """Escaped text whose `backticked` spans become <code>."""
    return _CODE.sub(r"<code>\1</code>", esc(x))


def plots_missing() -> str | None:
    """Why the report cannot have plots (matplotlib missing), or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: pip install 'lstmwatch[plots]' to get them"
    return None


def render(run: Any, *, plots: bool = True, title: str | None = None, dpi: int = 96) -> str:
    """The report of a Watcher, a Run or a run log path as one HTML string."""
    view = as_run(run)
    findings = diagnose(view.events)
    name = title or view.name
    sections = [
        _header(view, name),
        _diagnosis(view, findings),
        _plots(view, plots, dpi),
        _events(view.events),
        _model(view),
        _footer(view),
    ]
    return page(f"lstmwatch report: {name}", "\n" + "\n".join(sections) + "\n")


def fragment(run: Any, *, plots: bool = True, dpi: int = 72) -> str:
    """The diagnosis and the plots of a run as one self-contained HTML fragment, for a notebook cell's output."""
    view = as_run(run)
    body = "\n".join([_header(view, view.name), _diagnosis(view, diagnose(view.events)), _plots(view, plots, dpi)])
    # The report's style, confined to the fragment's own box so that it cannot restyle the notebook around it.
    return f"<div class=\"{FRAGMENT_CLASS}\"><style>{scoped_css(f'.{FRAGMENT_CLASS}')}</style>{body}</div>"


def write(run: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """Write the report of a run to `path` (its folder is created); returns the path."""
    text = render(run, **kwargs)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# --- the page

# The report's style, shared by every page lstmwatch writes (the demo's index too).
CSS = """
:root { --ink:#1d2330; --muted:#5b6473; --line:#e3e6eb; --bg:#f6f7f9; --ok:#1e7b34; --okbg:#e8f5ec;
  --error:#b42318; --errorbg:#fdecea; --warning:#b54708; --warningbg:#fef4e6; --info:#475467; --infobg:#eef1f5; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h1 .run { font-weight: 500; color: var(--muted); }
h2 { font-size: 19px; margin: 0 0 12px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:20px 24px; margin:18px 0; }
.meta { color: var(--muted); margin: 0; font-size: 13.5px; }
header .meta span { white-space: nowrap; }
.meta span + span::before { content: "\\00b7\\0020"; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.88em; }
code { background:#f1f3f6; padding:1px 5px; border-radius:4px; overflow-wrap:anywhere; }
pre { background:#f6f7f9; border:1px solid var(--line); border-radius:6px; padding:12px; overflow-x:auto;
  white-space:pre-wrap; }
.verdict { font-size: 18px; font-weight: 600; padding: 12px 16px; border-radius: 8px; margin-bottom: 16px; }
.verdict.ok { background: var(--okbg); color: var(--ok); }
.verdict.error { background: var(--errorbg); color: var(--error); }
.verdict.warning { background: var(--warningbg); color: var(--warning); }
.verdict.info { background: var(--infobg); color: var(--info); }
.verdict small { display:block; font-size: 13.5px; font-weight: 400; color: var(--muted); }
ol.findings { list-style: none; padding: 0; margin: 0; counter-reset: f; }
ol.findings > li { counter-increment: f; border:1px solid var(--line); border-left:5px solid var(--info);
  border-radius: 8px; padding: 12px 16px 12px 48px; margin: 0 0 12px; position: relative; }
ol.findings > li::before { content: counter(f); position:absolute; left:14px; top:11px; width:24px; height:24px;
  border-radius:12px; background:var(--ink); color:#fff; font-weight:600; font-size:13px; text-align:center;
  line-height:24px; }
ol.findings > li.error { border-left-color: var(--error); }
ol.findings > li.warning { border-left-color: var(--warning); }
.finding-head { font-size: 16px; }
.finding-head .where { color: var(--muted); font-size: 14px; }
.finding p { margin: 6px 0 0; }
.fix { background:#f3f8f4; border-radius:6px; padding:8px 12px; }
.fix b { color: var(--ok); }
.explains { color: var(--muted); font-size: 14px; }
.badge { display:inline-block; font-size:11.5px; font-weight:700; text-transform:uppercase; letter-spacing:.04em;
  padding:1px 7px; border-radius:10px; vertical-align: 2px; }
.badge.error { background: var(--errorbg); color: var(--error); }
.badge.warning { background: var(--warningbg); color: var(--warning); }
.badge.info { background: var(--infobg); color: var(--info); }
.badge.ok { background: var(--okbg); color: var(--ok); }
details { margin-top: 14px; }
summary { cursor: pointer; color: var(--muted); }
img.plots { width: 100%; height: auto; display: block; }
.note { background: var(--infobg); color: var(--info); padding: 10px 14px; border-radius: 6px; margin: 0; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f6f7f9; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .hint { color: var(--muted); font-size: 12.5px; margin-top: 3px; }
td.module { white-space: nowrap; word-break: keep-all; }
td.module code { overflow-wrap: normal; white-space: nowrap; }
.scroll { overflow-x: auto; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; margin-top: 20px; }
"""


FRAGMENT_CLASS = "lstmwatch-report"
_RULE = re.compile(r"([^{}]+)\{([^{}]*)\}")


def scoped_css(root: str) -> str:
    """CSS with every rule confined to the elements under `root` (a selector); the page-wide rules left out."""
    rules = []
    for selectors, body in _RULE.findall(CSS):
        scoped = []
        for sel in (x.strip() for x in selectors.split(",")):
            if sel in ("body", "main"):
                continue  # the notebook's page, not ours
            scoped.append(root if sel == ":root" else f"{root} {sel}")
        if scoped:
            rules.append(f"{', '.join(scoped)} {{{body}}}")
    # The fragment draws its own background, so that the sections read as on the report's page.
    rules.append(f"{root} {{ background: var(--bg); color: var(--ink); padding: 4px 12px; border-radius: 10px; "
                 "font: 14px/1.5 -apple-system, \"Segoe UI\", Roboto, \"Helvetica Neue\", Arial, sans-serif; }")
    return "\n".join(rules)


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page in the report's style: `title` is text (escaped), `body` is HTML."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


# --- sections


def _header(view: Run, name: str) -> str:
    h = view.header
    meta = [f"{view.step_count} steps watched", f"{len(view.records)} records", f"{len(view.events)} events"]
    if isinstance(h.get("log_every"), int):
        meta.append(f"logged every {h['log_every']} steps")
    versions = [f"{k} {h[k]}" for k in ("lstmwatch", "torch", "python") if h.get(k)]
    meta += versions
    if h.get("created"):
        meta.append(f"started {h['created']}")
    if view.source:
        meta.append(f"log {view.source}")
    spans = " ".join(f"<span>{esc(m)}</span>" for m in meta)  # the spaces are where a line may break
    return (f"<header><h1>lstmwatch report <span class=\"run\">{esc(name)}</span></h1>"
            f"<p class=\"meta\">{spans}</p></header>")


def _sev(e: Event) -> str:
    return e.severity if e.severity in ("error", "warning", "info") else "info"


def _diagnosis(view: Run, findings: list[Finding]) -> str:
    out = ["<section id=\"diagnosis\"><h2>Diagnosis</h2>"]
    mods = ", ".join(view.modules)
    cut = "" if view.complete else (" The log has no closing line: the run was cut short (a crash, or it is still "
                                    "running), so this covers only what was written.")
    if not view.records and not view.events:
        out.append(f"<div class=\"verdict info\">Nothing was logged.<small>No records in this run: it stopped before "
                   f"the first logging step.{esc(cut)}</small></div>")
    elif not findings:
        out.append(f"<div class=\"verdict ok\">&#10003; No problem found in {view.step_count} steps."
                   f"<small>lstmwatch watched {esc(mods or 'the model')} and raised nothing: losses, gradients, "
                   f"gates and inputs stayed in their healthy ranges.{esc(cut)}</small></div>")
    else:
        worst = min((_sev(f.cause) for f in findings), key=("error", "warning", "info").index)
        n = len(findings)
        top = findings[0].cause
        where = f"{esc(top.kind)}{' in ' + esc(top.module) if top.module else ''}, from step {top.step}"
        head = f"1 root cause found: {where}" if n == 1 else f"{n} root causes found; the most likely: {where}"
        out.append(f"<div class=\"verdict {worst}\">&#9888; {head}.<small>"
                   + ("Fix it and run again." if n == 1 else
                      "Most likely first; each lists the findings it explains. Fix the first and run again.")
                   + f"{esc(cut)}</small></div>")
        out.append("<ol class=\"findings\">")
        for f in findings:
            out.append(_finding(f))
        out.append("</ol>")
    text = summary(findings, steps=view.step_count, modules=view.modules)
    out.append(f"<details><summary>As text (<code>lstmwatch summary</code>)</summary><pre>{esc(text)}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def _finding(f: Finding) -> str:
    e = f.cause
    where = f" in <code>{esc(e.module)}</code>" if e.module else " (whole run)"
    again = f", raised {f.count} times" if f.count > 1 else ""
    parts = [f"<li class=\"finding {_sev(e)}\"><div class=\"finding-head\"><span class=\"badge {_sev(e)}\">"
             f"{esc(e.severity)}</span> <b>{esc(e.kind)}</b>{where} <span class=\"where\">from step {e.step}"
             f"{again}</span></div>",
             f"<p>{prose(e.message)}</p>",
             f"<p class=\"fix\"><b>Fix:</b> {prose(e.hint)}</p>"]
    if f.consequences:
        items = ", ".join(f"{esc(c.kind)}{' in <code>' + esc(c.module) + '</code>' if c.module else ''} "
                          f"(step {c.step})" for c in f.consequences)
        parts.append(f"<p class=\"explains\">Which explains: {items}</p>")
    parts.append("</li>")
    return "\n".join(parts)


def _plots(view: Run, plots: bool, dpi: int) -> str:
    head = "<section id=\"plots\"><h2>Plots</h2>"
    if not plots:
        return head + "<p class=\"note\">Plots left out (--no-plots).</p></section>"
    missing = plots_missing()
    if missing:
        return head + f"<p class=\"note\">Plots left out: {esc(missing)}.</p></section>"
    try:
        from .figure import png

        data = base64.b64encode(png(view, dpi=dpi)).decode("ascii")
    except Exception as exc:  # noqa: BLE001 - a plot that fails must not cost the diagnosis
        return head + f"<p class=\"note\">Plots could not be drawn: {esc(type(exc).__name__)}: {esc(exc)}</p></section>"
    alt = "loss, gradient norm per layer, gate saturation, gradient through time, input statistics, update ratio"
    return (head + f"<img class=\"plots\" alt=\"{esc(alt)}\" src=\"data:image/png;base64,{data}\">"
            "<p class=\"meta\">Each panel's caption says what healthy looks like; green bands are healthy ranges, "
            "vertical lines mark the steps at which lstmwatch found something, grey areas follow the first NaN "
            "or Inf.</p></section>")


def _events(events: list[Event]) -> str:
    out = [f"<section id=\"events\"><h2>Events ({len(events)})</h2>"]
    if not events:
        out.append("<p class=\"note\">No events: lstmwatch raised nothing on this run.</p></section>")
        return "\n".join(out)
    out.append("<div class=\"scroll\"><table><thead><tr><th>step</th><th>severity</th><th>kind</th><th>module</th>"
               "<th>what was measured, and the fix</th></tr></thead><tbody>")
    for e in sorted(events, key=lambda e: e.step)[:MAX_EVENT_ROWS]:
        out.append(f"<tr><td class=\"num\">{e.step}</td><td><span class=\"badge {_sev(e)}\">{esc(e.severity)}</span>"
                   f"</td><td>{esc(e.kind)}</td><td class=\"module\">"
                   f"{'<code>' + esc(e.module) + '</code>' if e.module else '&mdash;'}"
                   f"</td><td>{prose(e.message)}<div class=\"hint\">fix: {prose(e.hint)}</div></td></tr>")
    out.append("</tbody></table></div>")
    if len(events) > MAX_EVENT_ROWS:
        out.append(f"<p class=\"meta\">{len(events) - MAX_EVENT_ROWS} more events are in the run log.</p>")
    out.append("</section>")
    return "\n".join(out)


def _model(view: Run) -> str:
    lstms = view.configs
    out = [f"<section id=\"model\"><h2>The model's LSTMs ({len(lstms)})</h2>"]
    if not lstms:
        out.append("<p class=\"note\">The run log does not describe the modules.</p></section>")
        return "\n".join(out)
    keys = [k for k in _CONFIG_ORDER if any(k in c for c in lstms.values())]
    keys += sorted({k for c in lstms.values() for k in c} - set(keys) - {"kind", "name"})
    out.append("<div class=\"scroll\"><table><thead><tr><th>module</th>"
               + "".join(f"<th>{esc(k.replace('_', ' '))}</th>" for k in keys) + "</tr></thead><tbody>")
    for name, cfg in lstms.items():
        cells = []
        for k in keys:
            v = cfg.get(k, "")
            if k == "parameters" and isinstance(v, int):
                cells.append(f"<td class=\"num\">{v:,}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f"<td class=\"num\">{esc(v)}</td>")
            else:
                cells.append(f"<td>{esc(v)}</td>")
        out.append(f"<tr><td class=\"module\"><code>{esc(name)}</code></td>{''.join(cells)}</tr>")
    out.append("</tbody></table></div></section>")
    return "\n".join(out)


def _footer(view: Run) -> str:
    src = f" from {esc(view.source)}" if view.source else ""
    return (f"<footer>Written by lstmwatch{src}. Self-contained: this page loads nothing from the network. "
            f"Regenerate with <code>lstmwatch report RUN.jsonl -o report.html</code>.</footer>")
