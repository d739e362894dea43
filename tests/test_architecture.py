"""The house rules: data flows one way, no import cycle, no private name across rooms, sinks fed with data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import lstmwatch
from lstmwatch.interfaces import Detector, Header, Sink, Summary
from lstmwatch.sinks import ConsoleSink, RunLogSink, WandbSink

PKG = Path(lstmwatch.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """lstmwatch module -> the lstmwatch modules it imports, anywhere in its body (lazy imports too)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {t for t in out if t in modules and t != name}
    return graph


def _private_imports() -> list[tuple[str, str, str]]:
    """(importer, source module, name) for every `from lstmwatch.x import _private`."""
    found = []
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                src = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                found += [(name, src, a.name) for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# Edges allowed to point back, each a lazy import inside one method: a Run shows itself in a notebook with the
# report's HTML (Run._repr_html_), while the report reads Runs.
DECLARED_BACK_EDGES = {("lstmwatch.run", "lstmwatch.report.html")}


def test_no_import_cycle_inside_the_package():
    graph = _imports()
    for a, b in DECLARED_BACK_EDGES:
        assert b in graph[a], f"declared back edge {a} -> {b} no longer exists: remove it from the list"
        graph[a] = graph[a] - {b}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    # The package's __init__ imports its rooms; a room importing the package root back is a cycle.
    assert cycles == []


def test_no_private_name_imported_across_rooms():
    crossing = [(a, s, n) for a, s, n in _private_imports() if _room(a) != _room(s)]
    assert crossing == []


def test_data_flows_one_way():
    graph = _imports()
    upstream = {"lstmwatch.watch", "lstmwatch.probes"} | {m for m in graph if m.startswith("lstmwatch.probes.")}
    downstream = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in
                  ("sinks", "report", "runlog", "detectors", "diagnose", "record", "keys", "events", "run")]
    reaching_back = {m: sorted(graph[m] & upstream) for m in downstream if graph[m] & upstream}
    assert reaching_back == {}


def test_remedies_reachable_after_import_lstmwatch():
    # Every saturation and vanishing hint tells users to run lstmwatch.remedies.set_forget_bias(...).
    code = ("import lstmwatch, torch; lstm = torch.nn.LSTM(3, 4); lstmwatch.remedies.set_forget_bias(lstm, 1.0); "
            "b = lstm.bias_ih_l0 + lstm.bias_hh_l0; assert torch.equal(b[4:8], torch.ones(4))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_sinks_and_detectors_are_protocols():
    assert isinstance(ConsoleSink(), Sink)
    assert issubclass(RunLogSink, Sink) and issubclass(WandbSink, Sink)
    from lstmwatch.detectors import default_detectors

    assert all(isinstance(d, Detector) for d in default_detectors())


class Recorder:
    """A user's sink: keeps every call it receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def start(self, header: Header) -> None:
        self.calls.append(("start", (header,)))

    def write(self, record, events) -> None:
        self.calls.append(("write", (record, list(events))))

    def close(self, summary: Summary) -> None:
        self.calls.append(("close", (summary,)))


def test_sinks_receive_data_never_the_watcher():
    torch.manual_seed(0)
    model = nn.LSTM(3, 5, num_layers=2, batch_first=True)
    rec = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = lstmwatch.watch(model, log_every=2, console=False, sinks=[rec])
    for _ in range(4):
        out, _ = model(torch.randn(4, 6, 3) * 100)  # unnormalized: events on the first records
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.step(loss)
    w.close()
    w.close()
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start", "write", "write", "write", "close"]  # steps 1, 2, 4; close once
    header = rec.calls[0][1][0]
    assert isinstance(header, Header) and header.names == ("lstm",) and header.log_every == 2
    assert header.modules[0].kind == "lstm" and header.modules[0].config["num_layers"] == 2
    written = [c[1] for c in rec.calls if c[0] == "write"]
    assert [r.step for r, _ in written] == [1, 2, 4]
    assert [e for _, evs in written for e in evs] == list(w.events) and w.events
    assert rec.calls[-1][1][0] == Summary(steps=4, records=3, events=len(w.events))
    for _, args in rec.calls:
        assert not any(isinstance(a, lstmwatch.Watcher) for a in args)
