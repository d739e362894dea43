"""Several processes (torch.distributed): every rank measures its own batch, rank 0 combines and reports.

On a logging step each rank brings its statistics to the host (as one process does) and hands them to rank 0
through torch.distributed's key-value store; rank 0 combines them key by key as `keys.combine_of` says and
runs the detectors and sinks on the result. The store, not a collective: a rank never waits for another
(rank 0 waits a bounded time for the others' values, then goes on without a rank that has not reported and
says so), so lstmwatch cannot hang a job or add work to the device's stream, and nothing is exchanged on
other steps. The logging schedule depends only on the step count, so every rank logs the same steps.

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
from collections import Counter
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
    """This process's place in a distributed job, and the exchange of a logging step's statistics."""

    def __init__(self, wait_s: float = WAIT_S):
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
        self._silent: set[int] = set()  # ranks that missed a logging step: not waited for until they report

    @property
    def leader(self) -> bool:
        """Whether this process reports: rank 0, or the only process."""
        return self.rank == 0

    def _key(self, step: int, rank: int) -> str:
        return f"lstmwatch/{self._id}/{step}/{rank}"

    def gather(self, step: int, values: Values, curves: Curves) -> list[tuple[int, Values, Curves]] | None:
        """Every rank's (rank, values, curves) of `step` on rank 0, its own first; None on other ranks (which
        only hand theirs over)."""
        if self.size == 1 or self._store is None:
            return [(self.rank, values, curves)] if self.leader else None
        if not self.leader:
            self._store.set(self._key(step, self.rank), pickle.dumps((values, curves)))
            return None
        got = [(0, values, curves)]
        for r in range(1, self.size):
            key = self._key(step, r)
            if not self._arrived(key, r, step):
                continue
            v, c = pickle.loads(self._store.get(key))
            self._store.delete_key(key)
            got.append((r, v, c))
        return got

    def _arrived(self, key: str, rank: int, step: int) -> bool:
        """Whether rank's values of `step` are in the store, waiting for them up to wait_s unless it is silent."""
        if self._store.check([key]):
            self._silent.discard(rank)
            return True
        if rank in self._silent:
            return False
        try:
            self._store.wait([key], timedelta(seconds=self.wait_s))
            return True
        except Exception:  # noqa: BLE001 - the store's timeout error type differs between backends
            self._silent.add(rank)
            warnings.warn(f"lstmwatch: rank {rank} did not hand over its statistics of step {step} within "
                          f"{self.wait_s:.0f} s (did it stop calling watcher.step(), or fall behind?); step "
                          f"{step} is combined without it, and so are later ones until it reports again",
                          LSTMWatchFailure, stacklevel=user_stacklevel())
            return False


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

