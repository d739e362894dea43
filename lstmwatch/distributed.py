"""Several processes (torch.distributed): every rank measures its own batch, rank 0 combines and reports.

On a logging step each rank brings its statistics to the host (as one process does) and hands them to rank 0
through torch.distributed's key-value store; rank 0 combines them key by key as `keys.combine_of` says and
runs the detectors and sinks on the result. The store, not a collective: a rank never waits for another
(rank 0 waits a bounded time for the others' values, then goes on without a rank that has not reported and
says so), so lstmwatch cannot hang a job or add work to the device's stream, and nothing is exchanged on
other steps. The logging schedule depends only on the step count, so every rank logs the same steps; a rank
whose count of watcher.step() calls drifted from rank 0's (a call skipped or repeated) is given rank 0's at its
next logging step (see Ranks).

Across ranks, means (fractions, saturation, losses) are the mean over ranks, each rank's sample counting
alike (DDP gives every rank the same batch size); maxima and minima are over ranks; the first non-finite step
is the earliest of any rank; gradient norms, measured on each rank's own batch before DDP averages them, are
the root mean square over ranks, which keeps the scale of one rank's batch, as a single process would see it.
"""

from __future__ import annotations

import itertools
import math
import pickle
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from . import keys
from .events import Event, LSTMWatchFailure
from .frames import user_stacklevel

WAIT_S = 120.0  # how long rank 0 waits at a logging step for a rank's values before going on without it
_IDS = itertools.count()  # watchers made in this process, in order: the same order on every rank

Values = dict[str, float]
Curves = dict[str, list[float]]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sharded(module: Any) -> bool:
    """Whether a module's parameters are shards of a DTensor (FSDP2's fully_shard, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


SHARDED = ("lstmwatch cannot watch {name}: its parameters are sharded across ranks (FSDP2's fully_shard, or "
           "tensor parallelism), and its gates and gradient norms need the whole weights. Watch the model "
           "under DistributedDataParallel, or leave this module out with watch(model, modules=...)")


def _store() -> Any:
    import torch.distributed.distributed_c10d as c10d

    return c10d._get_default_store()


class Ranks:
    """This process's place in a distributed job, and the exchange of a logging step's statistics.

    Each rank hands its values over in one key of its own, labelled with its step and its count of optimizer
    steps; rank 0 takes and deletes it, so the store never holds more than one per rank. The optimizer steps
    are the ranks' common clock (DDP steps them together): a rank whose count of watcher.step() calls drifted
    from rank 0's (a call skipped or repeated) hands over values labelled with a step rank 0 is not at. Rank 0
    then leaves them out and, in the rank's second key, gives it its own count less its optimizer steps; the
    rank reads that key at its next logging step and moves its count to rank 0's, so that later logging steps
    fall on the same optimizer steps again. Nothing is exchanged on other steps."""

    def __init__(self, wait_s: float = WAIT_S, modules: Iterable[Any] = ()):
        self.rank, self.size = world()
        self.wait_s = wait_s
        self._id = next(_IDS)
        self._store: Any = None
        if self.size > 1:
            try:
                self._store = _store()
            except Exception:  # noqa: BLE001 - a private torch API: without it, rank 0 reports its own values
                warnings.warn("lstmwatch: torch.distributed's key-value store cannot be reached, so the ranks' "
                              "statistics are not combined: rank 0 reports its own batch's only",
                              LSTMWatchFailure, stacklevel=user_stacklevel())
        # The optimizer steps that move the watched modules' weights: DDP takes them together on every rank.
        self.optimizer_steps = 0
        if self._store is not None:
            _count_optimizer_steps(self, {id(p) for m in modules for p in m.parameters()})
        self._silent: set[int] = set()  # ranks rank 0 went on without: not waited for until they are in step
        self._told: set[int] = set()  # of those, the ones given rank 0's count, which they have not read yet
        self._moves: dict[int, int] = {}  # how far each rank moved its count, not yet said
        self.moved = 0  # another rank: how far its last gather() moved its step count to rank 0's
        self._unsaid = 0  # another rank: moves rank 0 has not heard of yet

    @property
    def leader(self) -> bool:
        """Whether this process reports: rank 0, or the only process."""
        return self.rank == 0

    def _key(self, what: str, rank: int) -> str:
        return f"lstmwatch/{self._id}/{what}/{rank}"

    def gather(self, step: int, values: Values, curves: Curves,
               is_logging: Callable[[int], bool] = lambda _: True) -> list[tuple[int, Values, Curves]] | None:
        """Every rank's (rank, values, curves) of `step` on rank 0, its own first; None on other ranks (which
        only hand theirs over, after taking rank 0's step count if it gave them it: `moved` says how far)."""
        self.moved = 0
        if self.size == 1 or self._store is None:
            return [(self.rank, values, curves)] if self.leader else None
        opt = self.optimizer_steps
        if not self.leader:
            told = self._key("count", self.rank)
            if self._store.check([told]):  # rank 0's count less its optimizer steps: this rank's is off
                given = int(self._store.get(told))
                self._store.delete_key(told)
                if opt > 0 and opt + given > 0:
                    self.moved = opt + given - step
                    self._unsaid += self.moved
            label = step + self.moved
            if not self.moved or is_logging(label):  # values of a step rank 0 does not log would stay unread
                self._store.set(self._key("values", self.rank), pickle.dumps((label, opt, self._unsaid, values,
                                                                              curves)))
                self._unsaid = 0
            return None
        lead = step - opt if opt > 0 else None  # what every rank's step less its optimizer steps must be
        got = [(0, values, curves)]
        for r in range(1, self.size):
            part = self._take(r, step, lead)
            if part is not None:
                got.append((r, *part))
        return got

    def _take(self, rank: int, step: int, lead: int | None) -> tuple[Values, Curves] | None:
        """On rank 0: rank's values of `step`, waiting for them up to wait_s unless it is silent; None when they
        do not come, or come from another optimizer step (the rank is then given rank 0's count)."""
        key = self._key("values", rank)
        if rank in self._told and not self._store.check([self._key("count", rank)]):
            self._told.discard(rank)  # it took rank 0's count at a logging step of its own: in step again
            self._silent.discard(rank)
        for _ in range(2):  # a late handover of an earlier step is dropped, and this step's waited for
            if rank in self._silent:
                if not self._store.check([key]):
                    return None
            elif not self._arrived(key, rank, step, lead):
                return None
            label, opt, moved, v, c = pickle.loads(self._store.get(key))
            self._store.delete_key(key)
            skew = label - opt if opt > 0 else None
            if lead is not None and skew is not None and skew != lead:
                # Its count of step() calls is not rank 0's: these values are of another optimizer step.
                self._tell(rank, lead)
                return None
            if moved:
                self._moves[rank] = self._moves.get(rank, 0) + moved
            if label == step:
                self._silent.discard(rank)
                moved = self._moves.pop(rank, 0)
                if moved:
                    n = f"{abs(moved)} {'fewer' if moved > 0 else 'more'} call{'s' if abs(moved) > 1 else ''}"
                    warnings.warn(f"lstmwatch: rank {rank} had counted {n} of watcher.step() than rank 0 for the "
                                  f"same optimizer steps (a call skipped or repeated on one of them?); it has "
                                  f"taken rank 0's count, and its statistics are combined again from step {step}",
                                  LSTMWatchFailure, stacklevel=user_stacklevel())
                return v, c
            if skew is None:  # no optimizer steps to tell whether it is in step: not waited for
                return None
            self._silent.discard(rank)  # in step, late at an earlier logging step: this one's values follow
        return None

    def _tell(self, rank: int, lead: int) -> None:
        """Give a rank rank 0's step count less its optimizer steps, for its next logging step; until it has
        read it, it is not waited for."""
        self._store.set(self._key("count", rank), str(lead))
        self._told.add(rank)
        self._silent.add(rank)

    def _arrived(self, key: str, rank: int, step: int, lead: int | None) -> bool:
        """Whether rank's values are in the store, waiting for them up to wait_s."""
        try:
            self._store.wait([key], timedelta(seconds=self.wait_s))
            return True
        except Exception:  # noqa: BLE001 - the store's timeout error type differs between backends
            warnings.warn(f"lstmwatch: rank {rank} did not hand over its statistics of step {step} within "
                          f"{self.wait_s:.0f} s (did it stop calling watcher.step(), or fall behind?); step "
                          f"{step} is combined without it, and so are later ones until it reports again"
                          + (" (a rank whose count of step() calls drifted takes rank 0's at its next logging "
                             "step)" if lead is not None else ""),
                          LSTMWatchFailure, stacklevel=user_stacklevel())
            if lead is not None:
                self._tell(rank, lead)
            else:
                self._silent.add(rank)
            return False


def _count_optimizer_steps(ranks: Ranks, params: set[int]) -> None:
    """Count in `ranks.optimizer_steps` the steps of optimizers that hold some of `params`: a global optimizer
    step pre-hook, removed when `ranks` is collected."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    ref = weakref.ref(ranks)
    holds: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()  # opt: (groups, holds)

    def count(opt: Any, args: Any, kwargs: Any) -> None:
        r = ref()
        if r is None:
            return
        try:  # inside the user's optimizer.step(): an optimizer of an unusual shape must not raise there
            known = holds.get(opt)
            if known is None or known[0] != len(opt.param_groups):
                known = holds[opt] = (len(opt.param_groups),
                                      any(id(p) in params for g in opt.param_groups for p in g["params"]))
        except Exception:  # noqa: BLE001 - not counted: its steps cannot be told apart
            return
        if known[1]:
            r.optimizer_steps += 1

    weakref.finalize(ranks, register_optimizer_step_pre_hook(count).remove)


def combine(parts: list[tuple[int, Values, Curves]]) -> tuple[Values, Curves, dict[str, int]]:
    """The ranks' values and curves combined key by key; and for each key whose extreme (max, min, first
    non-finite step) or outlying mean came from one rank, that rank."""
    if len(parts) == 1:
        return parts[0][1], parts[0][2], {}
    values: Values = {}
    source: dict[str, int] = {}
    for k in dict.fromkeys(k for _, v, _ in parts for k in v):
        got = [(r, v[k]) for r, v, _ in parts if k in v]
        how = keys.combine_of(k)
        xs = [x for _, x in got]
        if how is keys.Combine.NORM:
            values[k] = math.sqrt(sum(x * x for x in xs) / len(xs))
        elif how in (keys.Combine.MAX, keys.Combine.MIN, keys.Combine.FIRST):
            nan = [r for r, x in got if math.isnan(x)]
            if nan:  # a statistic NaN on a rank is NaN for the job (max() and min() would depend on the order)
                values[k] = math.nan
                if len(nan) < len(got):
                    source[k] = nan[0]
                continue
            pick = max if how is keys.Combine.MAX else min
            values[k] = pick(xs)
            if len(set(xs)) > 1:
                source[k] = next(r for r, x in got if x == values[k])
        elif how is keys.Combine.SUM:
            values[k] = sum(xs)
        else:  # MEAN, LAST: ranks alike
            values[k] = sum(xs) / len(xs)
            outlier = _outlier(got)
            if outlier is not None:
                source[k] = outlier
    curves: Curves = {}
    for k in dict.fromkeys(k for _, _, c in parts for k in c):
        cs = [c[k] for _, _, c in parts if k in c and len(c[k]) == len(parts[0][2].get(k, c[k]))]
        curves[k] = [math.sqrt(sum(x * x for x in col) / len(col)) for col in zip(*cs)]
    return values, curves, source


def _outlier(got: list[tuple[int, float]]) -> int | None:
    """The one rank whose value stands apart from the others' (three ranks or more: with two, either could)."""
    if len(got) < 3 or not all(math.isfinite(x) for _, x in got):
        return None
    mid = sorted(x for _, x in got)[len(got) // 2]
    far = sorted(((abs(x - mid), r) for r, x in got), reverse=True)
    (d1, r1), (d2, _) = far[0], far[1]
    return r1 if d1 > 0.5 * max(abs(mid), 1e-12) and d1 > 2 * d2 else None


def name_ranks(events: list[Event], source: dict[str, int], size: int) -> list[Event]:
    """Events whose module's statistics point at one rank say which: the rank most of the module's extreme
    values (under the event's site or layer) came from."""
    if not source or size == 1:
        return events
    out = []
    for e in events:
        prefix = f"{e.module}/{e.where}" if e.module and e.where else e.module
        if e.kind == "nonfinite" and e.where:
            ranks = [r for k, r in source.items() if keys.parse(k).group == keys.NONFINITE and k.endswith(e.where)]
        else:
            ranks = [r for k, r in source.items() if prefix and k.startswith(prefix)]
        if not ranks:
            out.append(e)
            continue
        rank, _ = Counter(ranks).most_common(1)[0]
        out.append(Event(e.step, e.kind, e.severity, e.module, f"{e.message} (on rank {rank} of {size})", e.hint,
                         e.where, {**e.values, "rank": float(rank)}))
    return out


def wait_s_from(value: float | None) -> float:
    """The wait given to watch(), checked."""
    if value is None:
        return WAIT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"rank_timeout must be a number of seconds > 0, got {value!r}")
    return float(value)

