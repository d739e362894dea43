"""Probes: one per watched module, chosen by module type. A probe owns its hooks and removes itself.

Hooks only keep references and launch device work; nothing here reads a value back. On a logging step the
forward hook keeps a sample of the batch, a snapshot of the weights it ran with and tensor hooks on the
outputs; `collect` then recomputes the gates and the gradient through time for that sample and returns
device tensors.

    base.py     Probe: hooks lifecycle, gradient norms, update ratio, non-finite marks; hook failures kept, never raised
    hooks.py    the forward hook's registration, kept out of copies and pickles of the watched model
    capture.py  what a logging step's forward keeps of nn.LSTM / nn.GRU, each argument checked against nn.LSTM's
                signature: sampled rows, output-gradient hooks
    rnn.py      LSTMProbe, GRUProbe: recomputation through the production recurrence (lstmwatch.recurrence)
    cell.py     LSTMCellProbe, GRUCellProbe: cells stepped by hand, the same per-step gates
"""

from __future__ import annotations

from torch import nn

from .base import Probe
from .cell import CellProbe, GRUCellProbe, LSTMCellProbe
from .rnn import GRUProbe, LSTMProbe, RNNProbe

__all__ = ["Probe", "RNNProbe", "LSTMProbe", "GRUProbe", "CellProbe", "LSTMCellProbe", "GRUCellProbe", "PROBES",
           "probe_for"]

# Which probe watches which module type; the first match in order wins.
PROBES: dict[type[nn.Module], type[Probe]] = {
    nn.LSTM: LSTMProbe, nn.GRU: GRUProbe, nn.LSTMCell: LSTMCellProbe, nn.GRUCell: GRUCellProbe,
}


def probe_for(module: nn.Module) -> type[Probe] | None:
    """The probe class for a module, or None if lstmwatch does not watch its type."""
    for t, cls in PROBES.items():
        if isinstance(module, t):
            return cls
    return None
