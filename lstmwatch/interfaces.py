"""The contracts between the rooms: what a watcher hands its sinks (Header, records and events, Summary),
and the Sink and Detector protocols any user object can meet."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from .events import Event
from .record import Record


@dataclass(frozen=True)
class ModuleInfo:
    """One watched module: its qualified name, its probe's kind, its configuration as plain values."""

    name: str
    kind: str = ""  # 'lstm', 'gru', 'lstm_cell', 'gru_cell'
    config: dict[str, Any] = field(default_factory=dict, hash=False)  # type, parameters, hidden_size, ...

    def as_dict(self) -> dict[str, Any]:
        """As the run log's header holds it: {'name', 'kind', **config}."""
        return {"name": self.name, "kind": self.kind, **self.config}


@dataclass(frozen=True)
class Header:
    """What a run is, built once by the watcher when it starts: versions, settings, the watched modules."""

    modules: tuple[ModuleInfo, ...]
    log_every: int | None = None  # None: a callable schedule
    sample: int | None = None
    lstmwatch: str = ""
    torch: str = ""
    python: str = field(default_factory=platform.python_version)
    pid: int = field(default_factory=os.getpid)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    world_size: int = 1  # processes of a torch.distributed job whose statistics the records combine
    name: str = ""  # the run's name given to watch(name=...); '' for none (the log is named by time and pid)

    @property
    def names(self) -> tuple[str, ...]:
        """Qualified names of the watched modules."""
        return tuple(m.name for m in self.modules)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, modules as a list of {'name', 'kind', **config}."""
        d = asdict(self)
        d["modules"] = [m.as_dict() for m in self.modules]
        return d

    @classmethod
    def of(cls, modules: Sequence[ModuleInfo], log_every: Any = None, sample: int | None = None,
           world_size: int = 1, name: str = "") -> Header:
        """A header stamped with this lstmwatch's and torch's versions."""
        import torch

        from .version import __version__

        every = log_every if isinstance(log_every, int) and not isinstance(log_every, bool) else None
        return cls(tuple(modules), every, sample, __version__, torch.__version__, world_size=world_size,
                   name=name)


@dataclass(frozen=True)
class Summary:
    """How a run ended, handed to the sinks when the watcher closes."""

    steps: int  # step() calls
    records: int = 0
    events: int = 0


@runtime_checkable
class Sink(Protocol):
    """Receives a run: `start` once, `write` on each logging step, `close` once. Reads nothing back."""

    def start(self, header: Header) -> None:
        """The run begins."""

    def write(self, record: Record, events: Sequence[Event]) -> None:
        """One logging step's record and the events the detectors raised on it."""

    def close(self, summary: Summary) -> None:
        """The run ends; flush and release what the sink holds."""


@runtime_checkable
class Detector(Protocol):
    """Reads records, returns events; never acts by itself."""

    @property
    def kind(self) -> str:
        """The kind of the events it raises ('stalled_loss')."""

    def update(self, record: Record) -> list[Event]:
        """Read one record; return the events it raises."""
