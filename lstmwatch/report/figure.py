"""One matplotlib figure of a run: loss, gradient norms, gate saturation, gradient through time, inputs, updates.

Each panel says what healthy looks like, in a caption under its title and, where a range is known,
as a shaded band. Statistics are read through the Record's accessors and keys built by lstmwatch.keys.
matplotlib is imported here only, when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import keys
from ..events import Event
from ..record import Record
from ..run import Run
from .source import as_run

# Panel labels (Axes.get_label()), in reading order: left to right, top to bottom.
PANELS = ("loss", "grad_norm", "saturation", "through_time", "inputs", "update_ratio")
TITLES = {
    "loss": "Loss",
    "grad_norm": "Gradient norm per layer",
    "saturation": "Gate saturation per gate and layer",
    "through_time": "Gradient through time, dL/dh_t",
    "inputs": "Input statistics",
    "update_ratio": "Update / weight per layer",
}
CAPTIONS = {
    "loss": "healthy: falls, then flattens; never climbs back above its early values. Lines mark what lstmwatch found.",
    "grad_norm": "healthy: each layer inside 0.1x-10x of the run's median (shaded), slowly falling; no layer far "
                 "below the rest.",
    "saturation": "healthy: under half the units pinned (sigmoid <0.1 or >0.9, tanh |x|>0.9; shaded); a forget "
                  "gate near 1 can be memory.",
    "through_time": "healthy: reaches back as far as the task must remember and flattens with training; a fall of "
                    "many decades that stays starves the early steps.",
    "inputs": "healthy: std near 1 and |x| max below ~10 (shaded); zero padding 0%, or the batch is packed.",
    "update_ratio": "healthy: |dw|/|w| near 1e-3 per step (shaded 1e-4 to 1e-2); far below: learning rate too low, "
                    "far above: too high.",
}
# The saturation caption's last words for a run of GRUs only, or of LSTMs and GRUs together: a GRU has no forget
# gate, its update gate near 1 is what keeps the state.
GRU_SATURATION_TAIL = {"gru": "an update gate near 1 can be memory.", "both": "a forget or update gate near 1 can be "
                       "memory."}
LSTM_SATURATION_TAIL = "a forget gate near 1 can be memory."
ALL_MODULES = {"lstm": "all LSTMs", "gru": "all GRUs", "both": "all LSTMs and GRUs"}
GRU_GATES = frozenset({"reset", "update", "new"})
GATE_COLORS = {"input": "#1f77b4", "forget": "#ff7f0e", "cell": "#2ca02c", "output": "#d62728",
               "reset": "#9467bd", "update": "#8c564b", "new": "#2ca02c", "h": "#7f7f7f"}
SEVERITY_COLORS = {"error": "#c0392b", "warning": "#e67e22", "info": "#7f8c8d"}
HEALTHY = "#2ca02c"
FIGSIZE = (12.0, 12.5)  # inches; 1150 px wide at the report's 96 dpi
# Past this many points a series is drawn as a plain line: markers on thousands of points merge into a blob.
MAX_MARKED_POINTS = 200
# Legend labels of values that a log axis cannot show, drawn on a floor line under the panel's data.
ZERO_LABELS = {"grad_norm": "0 (no gradient)", "update_ratio": "0 (no update)"}
# Gate line widths and layers: the forget gate sits wide and underneath, so that where gates overlap
# (all pinned at 1.0, say) it shows as a halo around the other lines instead of vanishing behind them.
GATE_WIDTH = {"forget": 3.2}
GATE_ZORDER = {"forget": 2.0}


def plot(run: Any) -> Any:
    """One matplotlib Figure of a Watcher, a Run from lstmwatch.load, or a run log path; pyplot never sees it."""
    # Built outside pyplot: a pyplot figure is shown by the notebook's inline backend at the end of the cell
    # and then again by the repr of the returned value. Save it with fig.savefig(...); plt.show() won't see it.
    return figure(run)


def figure(run: Any) -> Any:
    """The figure of a run outside pyplot (no global state, nothing to close): for notebooks, files and reports."""
    _require()
    fig = _figure_class()(figsize=FIGSIZE)
    draw(as_run(run), fig)
    return fig


def png(run: Any, dpi: int = 96) -> bytes:
    """The figure of a run as PNG bytes."""
    return _png(figure(run), dpi)


def _png(fig: Any, dpi: int) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _require() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("lstmwatch's plots need matplotlib: pip install 'lstmwatch[plots]'") from None


_FIGURE_CLASS: Any = None


def _figure_class() -> Any:
    """matplotlib's Figure with a PNG repr, made once, the first time a figure is drawn."""
    global _FIGURE_CLASS
    if _FIGURE_CLASS is None:
        from matplotlib.figure import Figure

        class RunFigure(Figure):
            """A Figure that a notebook shows as PNG even when pyplot was never imported (IPython then has no
            formatter for figures); where the inline backend registered one, that one is used instead."""

            def _repr_png_(self) -> bytes:
                return _png(self, 72)

        # Reachable as lstmwatch.report.figure.RunFigure, so that the figure pickles like any other.
        RunFigure.__qualname__ = "RunFigure"
        globals()["RunFigure"] = _FIGURE_CLASS = RunFigure
    return _FIGURE_CLASS


# --- drawing

def draw(view: Run, fig: Any) -> None:
    """Draw the six panels of a run into an empty figure."""
    # Fixed margins rather than constrained layout, which took over half of the drawing time.
    axes = fig.subplots(3, 2, gridspec_kw={"left": 0.065, "right": 0.945, "top": 0.915, "bottom": 0.045,
                                           "hspace": 0.5, "wspace": 0.3})
    by = dict(zip(PANELS, axes.flat))
    recs = sorted(view.records, key=lambda r: r.step)
    mods = view.modules or sorted({m for r in recs for m in r.modules})
    steps = max(view.step_count, max((r.step for r in recs), default=0), 1)
    first = _first_events(view.events)
    bad = _first_nonfinite(recs)
    types = _types(recs, mods)
    captions = dict(CAPTIONS)
    if types != "lstm":
        captions["saturation"] = captions["saturation"].replace(LSTM_SATURATION_TAIL, GRU_SATURATION_TAIL[types])
    for name, ax in by.items():
        ax.set_label(name)
        _title(ax, TITLES[name], captions[name])
        if name != "through_time":
            ax.set_xlim(0, steps * 1.02)
            ax.set_xlabel("step")
            if bad is not None:
                ax.axvspan(bad, steps * 1.02, color="#888", alpha=0.13, lw=0, zorder=0,
                           label="after the first NaN/Inf" if name == "loss" else None)
            for e in first:
                if name != "loss":
                    ax.axvline(e.step, color=SEVERITY_COLORS.get(e.severity, "#7f8c8d"), lw=0.8, alpha=0.35, zorder=0)
        ax.grid(True, which="major", alpha=0.25)
    _loss(by["loss"], recs, first, multi=len(mods) > 1)
    _grad_norm(by["grad_norm"], recs, mods, ALL_MODULES[types])
    _saturation(by["saturation"], recs, mods)
    _through_time(by["through_time"], recs, mods)
    _inputs(by["inputs"], recs, mods)
    _update_ratio(by["update_ratio"], recs, mods)
    where = f" on {', '.join(mods)}" if mods else ""
    fig.suptitle(_t(f"lstmwatch · {view.name} · {steps} steps{where} · {len(recs)} records, "
                    f"{len(view.events)} events"), fontsize=13, fontweight="bold")


def _title(ax: Any, title: str, caption: str) -> None:
    import textwrap

    lines = textwrap.wrap(caption, 82)
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold", pad=6 + 10.5 * len(lines))
    ax.annotate("\n".join(lines), xy=(0, 1), xycoords="axes fraction", xytext=(0, 4), textcoords="offset points",
                va="bottom", ha="left", fontsize=8, color="#4d4d4d")


def _t(s: Any) -> str:
    """Text from the model or the run, safe from matplotlib's mathtext."""
    return str(s).replace("$", r"\$")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _series(recs: Sequence[Record], key: str, positive: bool = False) -> tuple[list[int], list[float]]:
    """Steps and values of one statistic (a key built by lstmwatch.keys); values a log axis cannot show become
    gaps (NaN)."""
    pts = _points(recs, key)
    return [x for x, _ in pts], [float(v) if _finite(v) and (v > 0 or not positive) else math.nan for _, v in pts]


def _points(recs: Sequence[Record], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records that have the statistic."""
    return [(r.step, v) for r in recs if (v := r.get(key)) is not None]


def _any(ys: Sequence[float]) -> bool:
    return any(not math.isnan(y) for y in ys)


def _marks(xs: Sequence[Any], marker: str, ms: float) -> dict[str, Any]:
    """Marker style for a series of len(xs) points: none past MAX_MARKED_POINTS."""
    if len(xs) > MAX_MARKED_POINTS:
        return {"marker": "None"}
    return {"marker": marker, "ms": ms}


def _zeros(recs: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """Steps of one statistic, with 1.0 where it is exactly 0 and NaN elsewhere: what the log axis would drop."""
    pts = _points(recs, key)
    return [x for x, _ in pts], [1.0 if v == 0 else math.nan for _, v in pts]


def _layers(recs: Sequence[Record], module: str, stat: str) -> list[str]:
    """Layer-direction labels (l0, l0_reverse, l1, ...) of a module that have `stat` in any of the records."""
    return sorted({lab for r in recs for lab in r.layers(module, stat)}, key=keys.layer_order)


def _layer_style(labs: list[str], lab: str, cmap: Any) -> dict[str, Any]:
    n = len({keys.layer_index(x) for x in labs})
    k = keys.layer_index(lab)
    return {"color": cmap(0.1 + 0.75 * k / max(1, n - 1)) if n > 1 else cmap(0.35),
            "ls": "--" if keys.is_reverse(lab) else "-"}


def _name(module: str, lab: str, multi: bool) -> str:
    lab = lab.replace("_reverse", " reverse")
    return _t(f"{module} {lab}" if multi else lab)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#888", fontsize=10)


def _legend(ax: Any, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, framealpha=0.85, **kw)


def _severity_rank(e: Event) -> int:
    order = ("error", "warning", "info")
    return order.index(e.severity) if e.severity in order else len(order)


def _first_nonfinite(recs: Sequence[Record]) -> int | None:
    """The first step at which a NaN or Inf appeared anywhere (loss, gradients, gates), or None."""
    steps = [v for r in recs for v, _, _ in r.nonfinite()]
    steps += [r.step for r in recs if r.loss is not None and not _finite(r.loss)]
    return int(min(steps)) if steps else None


def _first_events(events: Sequence[Event]) -> list[Event]:
    """The first event of each (kind, module): what gets a line on the plots."""
    seen: dict[tuple[str, str], Event] = {}
    for e in sorted(events, key=lambda e: e.step):
        seen.setdefault((e.kind, e.module), e)
    return list(seen.values())


def _loss(ax: Any, recs: Sequence[Record], first: list[Event], multi: bool) -> None:
    from matplotlib.transforms import blended_transform_factory

    xs = [r.step for r in recs if r.loss is not None]
    ys = [float(r.loss) if _finite(r.loss) else math.nan for r in recs if r.loss is not None]
    mx, my = _series(recs, keys.LOSS_MEAN)
    vx = [r.step for r in recs if r.val_loss is not None]
    vy = [float(r.val_loss) if _finite(r.val_loss) else math.nan for r in recs if r.val_loss is not None]
    if _any(ys):
        ax.plot(xs, ys, ls="-", lw=1.3, color="#1f77b4", label="loss (at the logging step)", **_marks(xs, "o", 3))
    if _any(my):
        ax.plot(mx, my, "-", lw=1, color="#1f77b4", alpha=0.45, label="mean since the previous log")
    if _any(vy):
        ax.plot(vx, vy, ls="-", lw=1.3, color="#9467bd", label="validation loss", **_marks(vx, "s", 4))
    vals = [v for v in ys + my + vy if not math.isnan(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 30:
        ax.set_yscale("log")
    top = blended_transform_factory(ax.transData, ax.transAxes)
    bad = [x for x, y in zip(xs, ys) if math.isnan(y)]
    if bad:
        ax.plot(bad, [0.97] * len(bad), "x", color="#c0392b", ms=6, mew=1.5, transform=top, label="loss NaN or Inf")
    if not vals and not bad:
        _empty(ax, "no loss recorded: pass the loss to watcher.step(loss)")
    # A line per step at which something was first found; one label per cluster of nearby lines.
    span = max(1.0, ax.get_xlim()[1])
    groups: list[list[Event]] = []
    for e in first:  # sorted by step
        if groups and e.step - groups[-1][0].step <= 0.04 * span:
            groups[-1].append(e)
        else:
            groups.append([e])
    for g, evs in enumerate(groups[:10]):
        for step in sorted({e.step for e in evs}):
            worst = min((e for e in evs if e.step == step), key=_severity_rank)
            ax.axvline(step, color=SEVERITY_COLORS.get(worst.severity, "#7f8c8d"), lw=1.2, alpha=0.8, zorder=1)
        worst = min(evs, key=_severity_rank)
        color = SEVERITY_COLORS.get(worst.severity, "#7f8c8d")
        text = "\n".join(f"{e.kind}{f' ({e.module})' if multi and e.module else ''} @{e.step}" for e in evs[:4])
        if len(evs) > 4:
            text += f"\n+{len(evs) - 4} more"
        right = evs[-1].step > 0.6 * span  # labels late in the run grow to the left of their line
        y = (0.92, 0.66, 0.40)[g % 3]  # neighbouring labels at staggered heights
        ax.text(evs[0].step if right else evs[-1].step, y, _t(text), transform=top, va="top",
                ha="right" if right else "left", fontsize=7, color=color,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "lw": 0.6, "alpha": 0.85})
    _legend(ax, loc="best")
    ax.set_ylabel("loss")


def _per_layer(ax: Any, recs: Sequence[Record], mods: list[str], stat: str,
               low: float = math.inf) -> tuple[int, int]:
    """One line per module and layer-direction of `{m}/{lab}/{stat}`, and where it is exactly 0 a mark on a floor
    line under the data and under `low` (a log axis drops 0, and a 0 is what the diagnosis names); how many lines
    and how many layer-directions with a 0 were drawn."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    lines, zeros = 0, []
    multi = len(mods) > 1
    for m in mods:
        labs = _layers(recs, m, stat)
        for lab in labs:
            key = keys.layer_key(m, lab, stat)
            style = _layer_style(labs, lab, cmap)
            xs, ys = _series(recs, key, positive=True)
            if _any(ys):
                ax.plot(xs, ys, lw=1.2, label=_name(m, lab, multi), **style, **_marks(xs, "o", 2.5))
                lines += 1
            zx, zy = _zeros(recs, key)
            if _any(zy):
                zeros.append((_name(m, lab, multi), style, zx, zy))
    if zeros:
        _zero_floor(ax, zeros, ZERO_LABELS.get(stat, "0"), low)
    return lines, len(zeros)


def _zero_floor(ax: Any, zeros: list[tuple[str, dict[str, Any], list[int], list[float]]], label: str,
                low: float) -> None:
    """Draw the zeros of each series on a dotted floor a decade under the lowest value drawn (and under `low`, a
    healthy band's bottom: a floor inside the band would read as healthy)."""
    lows = [y for line in ax.get_lines() for y in line.get_ydata() if _finite(y) and y > 0]
    lows += [low] if math.isfinite(low) else []
    floor = 10 ** (math.floor(math.log10(min(lows))) - 1) if lows else 1.0
    ax.axhline(floor, color="#555", ls=":", lw=1.0, zorder=1, label=label)
    for name, style, xs, ys in zeros:
        n = sum(1 for y in ys if not math.isnan(y))
        # Consecutive zero steps join into a thick segment on the floor; markers while there are few of them.
        ax.plot(xs, [floor * y for y in ys], color=style["color"], ls="-", lw=2.5, zorder=3, clip_on=False,
                label=_t(f"{name} = {label}"), **_marks(range(n), "v", 5))
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, floor / 2), max(hi, floor * 2))


def _types(recs: Sequence[Record], mods: list[str]) -> str:
    """'lstm', 'gru' or 'both': the kinds of the watched modules, told by their gates (a GRU's are reset, update,
    new); a module with no gates recorded counts as an LSTM."""
    grus = {m for m in mods if _is_gru(recs, m)}
    if not grus:
        return "lstm"
    return "gru" if grus.issuperset(mods) else "both"


def _is_gru(recs: Sequence[Record], module: str) -> bool:
    """Whether the first record with gates of the module shows a GRU's."""
    for r in recs:
        for lab in r.layers(module):
            gates = set(r.gates(module, lab)) - {"c", "h"}
            if gates:
                return bool(gates & GRU_GATES)
    return False


def _grad_norm(ax: Any, recs: Sequence[Record], mods: list[str], everything: str = "all LSTMs") -> None:
    lines, zeros = _per_layer(ax, recs, mods, "grad_norm")
    drew = lines + zeros > 0
    xs, ys = _series(recs, keys.GRAD_NORM, positive=True)
    good = sorted(y for y in ys if not math.isnan(y))
    if good:
        if lines != 1:  # with one layer the total is that layer's line
            ax.plot(xs, ys, "-", lw=1, color="black", alpha=0.6, label=everything)
        med = good[len(good) // 2]
        ax.axhspan(0.1 * med, 10 * med, color=HEALTHY, alpha=0.08, lw=0, label="0.1x-10x median")
        drew = True
    if drew:
        ax.set_yscale("log")
        _legend(ax, loc="best", ncol=2)
    else:
        _empty(ax, "no gradient recorded")
    ax.set_ylabel("gradient norm (log)")


def _saturation(ax: Any, recs: Sequence[Record], mods: list[str]) -> None:
    from matplotlib.lines import Line2D

    ax.axhspan(0, 0.5, color=HEALTHY, alpha=0.07, lw=0)
    gates_seen: list[str] = []
    n_layers = 1
    for m in mods:
        labs = _layers(recs, m, "h/sat")
        n_layers = max(n_layers, len(labs))
        for i, lab in enumerate(labs):
            alpha = 1.0 - 0.65 * i / max(1, len(labs) - 1)
            ls = "--" if keys.is_reverse(lab) else "-"
            # Sigmoid gates have sat_left/sat_right, tanh-valued ones sat; the cell state c is not drawn.
            gates = sorted({g for r in recs for g in r.gates(m, lab) if g != "c"
                            and any(r.get(keys.gate_key(m, lab, g, st)) is not None for st in ("sat_left", "sat"))},
                           key=_gate_order)
            for gate in gates:
                if gate == "h":
                    xs, ys = _series(recs, keys.gate_key(m, lab, "h", "sat"))
                    style: dict[str, Any] = {"ls": ":", "lw": 1.4}
                elif any(r.get(keys.gate_key(m, lab, gate, "sat_left")) is not None for r in recs):
                    xs, left = _series(recs, keys.gate_key(m, lab, gate, "sat_left"))
                    _, right = _series(recs, keys.gate_key(m, lab, gate, "sat_right"))
                    ys = [a + b for a, b in zip(left, right)] if len(right) == len(left) else left
                    style = {"ls": ls, "lw": GATE_WIDTH.get(gate, 1.3)}
                else:
                    xs, ys = _series(recs, keys.gate_key(m, lab, gate, "sat"))
                    style = {"ls": ls, "lw": GATE_WIDTH.get(gate, 1.3)}
                if _any(ys):
                    wide = gate in GATE_WIDTH
                    ax.plot(xs, ys, color=GATE_COLORS.get(gate, "#333"), alpha=alpha * (0.6 if wide else 1.0),
                            zorder=GATE_ZORDER.get(gate, 3.0), **style, **_marks(xs, "o", 2))
                    if gate not in gates_seen:
                        gates_seen.append(gate)
    if not gates_seen:
        _empty(ax, "no gate statistics recorded")
        return
    handles = [Line2D([], [], color=GATE_COLORS.get(g, "#333"), ls=":" if g == "h" else "-",
                      lw=GATE_WIDTH.get(g, 1.3), alpha=0.6 if g in GATE_WIDTH else 1.0,
                      label="hidden h" if g == "h" else (f"{g} gate" if g != "cell" else "cell gate g"))
               for g in gates_seen]
    if n_layers > 1:
        handles.append(Line2D([], [], color="#999", alpha=0.45, label="fainter: deeper layer"))
    ax.legend(handles=handles, fontsize=7, framealpha=0.85, loc="best", ncol=2)
    # Room above 1.0 and below 0, so that lines pinned there do not run along the frame.
    ax.set_ylim(-0.04, 1.06)
    ax.set_ylabel("fraction saturated")


def _gate_order(g: str) -> int:
    order = ("input", "forget", "cell", "output", "reset", "update", "new", "h")
    return order.index(g) if g in order else len(order)


def _through_time(ax: Any, recs: Sequence[Record], mods: list[str]) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    drew = False
    length, dead = 1, 0  # the longest curve; leading steps of the latest curve that got no gradient at all
    styles = ("-", "--", "-.", ":")
    for mi, m in enumerate(mods[:4]):
        # The records whose curve of the module (its top layer) got some gradient, with that curve.
        have = [(r, c) for r in recs if (c := r.curve(m)) is not None and any(_finite(v) and v > 0 for v in c)]
        if not have:
            continue
        n = min(4, len(have))
        picks = sorted({round(i * (len(have) - 1) / max(1, n - 1)) for i in range(n)})
        for j, idx in enumerate(picks):
            r, curve = have[idx]
            ys = [v if _finite(v) and v > 0 else math.nan for v in curve]
            ratio = r.get(keys.gtt_key(m, stat="ratio"))
            extra = "" if ratio is None or not _finite(ratio) else (
                f", first/last {ratio:.0e}" if ratio > 0 else ", none reaches t=0")
            who = f"{m} " if len(mods) > 1 else ""
            ax.plot(range(len(ys)), ys, ls=styles[mi % 4], lw=1.5, color=cmap(0.1 + 0.7 * j / max(1, len(picks) - 1)),
                    label=_t(f"{who}step {r.step}{extra}"))
            drew = True
            length = max(length, len(ys))
        last, curve = have[picks[-1]]
        lead = next((i for i, v in enumerate(curve) if _finite(v) and v > 0), 0)
        dead = max(dead, lead)
        deep = last.curve(m, keys.layer_label(0))
        n_layers = len(_layers(recs, m, "gtt/ratio"))
        if n_layers > 1 and deep is not None:
            ys = [v if _finite(v) and v > 0 else math.nan for v in deep]
            if _any(ys):
                ax.plot(range(len(ys)), ys, ls=":", lw=1.5, color="#555",
                        label=_t(f"{m + ' ' if len(mods) > 1 else ''}first layer l0, step {last.step}"))
    if drew:
        ax.set_yscale("log")
        ax.set_xlim(-0.5, length - 0.5)
        if dead:
            ax.axvspan(-0.5, dead - 0.5, color="#888", alpha=0.13, lw=0, zorder=0)
            ax.text(dead / 2, 0.04, f"no gradient\nreaches t < {dead}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="#555")
        _legend(ax, loc="best")
    else:
        _empty(ax, "no gradient through time recorded")
    ax.set_xlabel("timestep t (0 = first input)")
    ax.set_ylabel("||dL/dh_t|| (log)")


def _inputs(ax: Any, recs: Sequence[Record], mods: list[str]) -> None:
    ax.axhspan(0.1, 10, color=HEALTHY, alpha=0.07, lw=0)
    twin = ax.twinx()
    twin.set_label("inputs:pad_frac")
    drew = False
    multi = len(mods) > 1
    for i, m in enumerate(mods[:4]):
        who = f"{m} " if multi else ""
        color = ("#1f77b4", "#9467bd", "#17becf", "#bcbd22")[i]
        xs, ys = _series(recs, keys.data_key(m, "absmax"), positive=True)
        if _any(ys):
            ax.plot(xs, ys, ls="-", lw=1.3, color=color, label=_t(f"{who}|x| max"), **_marks(xs, "o", 2.5))
            drew = True
        xs, ys = _series(recs, keys.data_key(m, "std"), positive=True)
        if _any(ys):
            ax.plot(xs, ys, ls="--", lw=1.3, color=color, alpha=0.7, label=_t(f"{who}std"), **_marks(xs, "s", 2.5))
            drew = True
        xs, ys = _series(recs, keys.data_key(m, "pad_frac"))
        if _any(ys):
            twin.plot(xs, [100 * y for y in ys], "-", lw=1.6, color="#d62728", alpha=0.8,
                      label=_t(f"{who}zero padding (right axis)"))
    twin.set_ylim(-2, 102)
    twin.set_ylabel("zero padding, % of steps", color="#d62728", fontsize=8)
    twin.tick_params(axis="y", colors="#d62728", labelsize=8)
    if drew:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.05), max(hi, 20))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        # On the main axes, so that "best" steers clear of the scale lines; the padding line stays near 0.
        ax.legend(h1 + h2, l1 + l2, fontsize=7, framealpha=0.85, loc="best")
    else:
        _empty(ax, "no input statistics recorded")
    ax.set_ylabel("input scale (log)")


def _update_ratio(ax: Any, recs: Sequence[Record], mods: list[str]) -> None:
    ax.axhspan(1e-4, 1e-2, color=HEALTHY, alpha=0.07, lw=0)
    drew = sum(_per_layer(ax, recs, mods, "update_ratio", low=1e-4)) > 0
    ax.set_yscale("log")
    if drew:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 3e-5), max(hi, 3e-2))
        _legend(ax, loc="best", ncol=2)
    else:
        ax.set_ylim(1e-6, 1)
        _empty(ax, "no weight update recorded")
    ax.set_ylabel("|dw| / |w| per step (log)")
