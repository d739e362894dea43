"""Helpers of tests/test_field_safety.py and tests/test_fuzz.py: tiny models used the way people use them, and
training the same model watched and unwatched from one seed to compare them bit for bit.

Only lstmwatch's public API is used here (watch, Watcher.step/close/records/events/modules, the warning classes).
"""

from __future__ import annotations

import gc
import re
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import lstmwatch

F, H, T, B = 3, 8, 6, 4  # features, hidden, timesteps, batch: every model here is tiny
SEED = 1234


# --- data
def batches(n: int, *, t: int = T, b: int = B, f: int = F, seed: int = SEED, scale: float = 1.0,
            batch_first: bool = False) -> list[Tensor]:
    """n standard-normal batches (T, B, F) (or (B, T, F)), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, t, f) if batch_first else (t, b, f)
    return [torch.randn(*shape, generator=g) * scale for _ in range(n)]


def mean_loss(y: Tensor) -> Tensor:
    """A scalar loss that stays finite on an empty batch: sum over the batch / max(1, rows)."""
    return y.pow(2).sum() / max(1, y.shape[0] if y.dim() else 1)


# --- models
class LastStep(nn.Module):
    """(T, B, H) -> (B, H): the last timestep, so an LSTM returning only its output fits nn.Sequential."""

    def forward(self, x: Tensor) -> Tensor:
        return x[-1]


class Tagger(nn.Module):
    """nn.LSTM then a linear head on every step: loss = mean over the batch of the squared head."""

    def __init__(self, rnn: nn.Module | None = None, width: int = H):
        super().__init__()
        self.rnn = rnn if rnn is not None else nn.LSTM(F, H)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return mean_loss(self.head(out).transpose(0, 1).flatten(1))


# --- training
StepFn = Callable[[Any, int, Tensor], Any]  # (watcher, step number from 1, loss) -> watcher.step(...)


def default_step(watcher: Any, i: int, loss: Tensor) -> Any:
    return watcher.step(loss)


def train(model: nn.Module, data: Iterable[Any], forward: Callable[[nn.Module, Any], Tensor], *,
          watcher: Any = None, step: StepFn = default_step, lr: float = 0.05, seed: int = SEED + 1) -> None:
    """SGD over `data`, one optimizer step per item; `step(watcher, i, loss)` after each when watched."""
    torch.manual_seed(seed)  # dropout and anything else random: the same draws watched or not
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i, batch in enumerate(data, 1):
        loss = forward(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if watcher is not None:
            step(watcher, i, loss)


class Pair:
    """The same model trained unwatched (`plain`) and watched (`model`, `watcher`), with what was warned."""

    def __init__(self, plain: nn.Module, model: nn.Module, watcher: Any, log: list[warnings.WarningMessage]):
        self.plain, self.model, self.watcher, self.log = plain, model, watcher, log

    @property
    def failures(self) -> list[str]:
        return [str(w.message) for w in self.log if issubclass(w.category, lstmwatch.LSTMWatchFailure)]

    def warned(self, category: type[Warning]) -> list[warnings.WarningMessage]:
        return [w for w in self.log if issubclass(w.category, category)]


def compare(build: Callable[[], nn.Module], data: Sequence[Any], forward: Callable[[nn.Module, Any], Tensor], *,
            step: StepFn = default_step, after_watch: Callable[[nn.Module], Any] | None = None,
            close: bool = True, **watch_kw: Any) -> Pair:
    """Build the model twice from one seed; train one unwatched, the other watched; parameters must match.

    Every warning of the watched run is recorded (simplefilter 'always'), LSTMWatchFailure included, so a
    failure is seen as a warning and not turned into an error by the test configuration.
    """
    torch.manual_seed(SEED)
    plain = build()
    torch.manual_seed(SEED)
    model = build()
    if after_watch is not None:
        after_watch(plain)
    train(plain, data, forward)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        watcher = lstmwatch.watch(model, **watch_kw)
        if after_watch is not None:
            after_watch(model)
        train(model, data, forward, watcher=watcher, step=step)
        if close:
            watcher.close()
    assert_params_equal(plain, model)
    return Pair(plain, model, watcher, log)


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    """Every parameter bit-identical (torch.equal), by name."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    diff = [n for n in pa if not torch.equal(pa[n], pb[n])]
    assert not diff, f"parameters differ between the watched and the unwatched run: {diff}"


# --- what a record shows
_GATE = re.compile(r"^(?P<module>.+)/l\d+(?:_reverse)?/[^/]+/sat_right$")


def gate_keys(record: Any, module: str) -> list[str]:
    """The record's gate statistics (fraction of a sigmoid gate above 0.9) of one watched module."""
    return [k for k in record.stats if (m := _GATE.match(k)) and m.group("module") == module]


def assert_watched_after(watcher: Any, after: int = 0) -> None:
    """Records were produced, and one after step `after` holds gate statistics of every watched module."""
    records = list(watcher.records)
    assert records, "no record at all: nothing was watched"
    for name in watcher.modules:
        later = [r.step for r in records if r.step > after and gate_keys(r, name)]
        assert later, (f"no record after step {after} has gate statistics of {name!r} (records at steps "
                       f"{[r.step for r in records]}; keys of the last: {sorted(records[-1].stats)[:12]} ...)")


# --- marks left on objects
def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def grad_hook_count(model: nn.Module) -> int:
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, str, bytes,
           int, float, bool, type(None))


def stray_tensors(model: nn.Module, limit: int = 200_000) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors reachable from a model's object graph that are neither its parameters nor its buffers
    (the graph is walked with gc.get_referents; functions, classes and modules are not entered)."""
    allowed = {id(t) for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    stack: list[Any] = [model]
    found = []
    while stack and len(seen) < limit:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, Tensor):
            if id(o) not in allowed:
                found.append((type(o).__name__, tuple(o.shape)))
            continue
        if isinstance(o, _OPAQUE):
            continue
        stack.extend(gc.get_referents(o))
    return found
