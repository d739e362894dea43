"""Statistics as device tensors, and the one transfer that brings them to the host.

Every function here returns 0-d or 1-d tensors on the device of its input and never
reads a value back: the transfer in `to_host` is the only place that waits on the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOW, HIGH = 0.1, 0.9  # saturation bounds of Karpathy, Johnson and Fei-Fei (2015)
INF = math.inf


def data_stats(x: Tensor, mask: Tensor, packed: bool) -> dict[str, Tensor]:
    """Input statistics of (B, T, F) over the valid steps: scale, per-feature spread, trailing zeros.

    Nothing for an empty sample (no row, step or feature): nothing to measure.
    """
    if x.numel() == 0:
        return {}
    x = x.detach().float()
    fm = mask[..., None].float()
    n = fm.sum().clamp_min(1)
    mean_f = (x * fm).sum(dim=(0, 1)) / n  # (F,)
    var_f = (((x - mean_f) * fm) ** 2).sum(dim=(0, 1)) / n
    mean = mean_f.mean()
    std = ((var_f + (mean_f - mean) ** 2).mean()).sqrt()
    if packed:
        pad = x.new_zeros(())
    else:
        # Trailing timesteps whose features are all exactly zero: padding fed as data.
        zero = (x == 0).all(dim=-1).flip(1).int()  # (B, T), last step first
        pad = zero.cumprod(dim=1).sum() / zero.numel()
    return {
        "mean": mean,
        "std": std,
        "absmax": (x.abs() * fm).amax(),
        "feat_mean_absmax": mean_f.abs().amax(),
        "feat_std_max": var_f.sqrt().amax(),
        "feat_std_min": var_f.sqrt().amin(),
        "pad_frac": pad,
    }


class Summer(NamedTuple):
    """Sums over the valid steps of (S, T, ...) tensors, and the counts that make them means."""

    n: Tensor | int  # valid gate values of one gate: valid steps times H
    nh: Tensor | int  # valid hidden values: valid steps times P
    mask: Tensor | None  # (S, T) in the gates' dtype; None when every step is valid
    dtype: torch.dtype  # the gates' dtype, in which sums (of bools too) and fractions come

    @staticmethod
    def of(act: Tensor, h: Tensor, mask: Tensor | None) -> Summer:
        """For gates act (S, T, G, H) and hidden states h (S, T, P); mask (S, T) bool or None."""
        if mask is None:
            return Summer(act.shape[0] * act.shape[1] * act.shape[3], h.numel(), None, act.dtype)
        m = mask.to(act.dtype)
        return Summer(m.sum() * act.shape[3], m.sum() * h.shape[2], m, act.dtype)

    def total(self, x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
        """The sum of x (S, T, ...) over its valid steps (a bool tensor sums to its count), over dims or all."""
        if self.mask is not None:
            x = x * self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2)))
        return x.sum(dims, dtype=self.dtype) if dims is not None else x.sum(dtype=self.dtype)


def gate_stats(act: Tensor, h: Tensor, mask: Tensor | None, gates: tuple[str, ...], tanh: int,
               cell: tuple[Tensor, Tensor] | None = None) -> dict[tuple[str, str], Tensor]:
    """Gate, hidden and cell-state statistics of one layer-direction, keyed (gate or state, statistic).

    act (S, T, G, H): the gates after their nonlinearity, named by `gates` in order, all sigmoids but the one
    at index `tanh`; h (S, T, P); cell: (c, tanh(c)) (S, T, H) of an LSTM; mask (S, T), None if all valid.
    A few passes over act whatever G: sigmoid gates get mean, sat_left and sat_right, the tanh gate mean and
    sat (|x| > HIGH), h and c sat and absmean, c also absmax.
    """
    su = Summer.of(act, h, mask)
    dims = (0, 1, 3)
    # Comparisons write 0/1 in the gates' dtype into one buffer: into bool, and summing bools, is several
    # times slower on CPUs than the comparison itself.
    ind = torch.empty_like(act)
    mean = su.total(act, dims) / su.n  # (G,)
    left = su.total(torch.lt(act, LOW, out=ind), dims) / su.n
    right = su.total(torch.gt(act, HIGH, out=ind), dims) / su.n
    out = {}
    for k, gate in enumerate(gates):
        if k != tanh:
            out[gate, "mean"], out[gate, "sat_left"], out[gate, "sat_right"] = mean[k], left[k], right[k]
    out[gates[tanh], "mean"] = mean[tanh]
    out[gates[tanh], "sat"] = right[tanh] + su.total(torch.lt(act[:, :, tanh], -HIGH, out=ind[:, :, tanh])) / su.n
    ha = h.abs()
    out["h", "absmean"] = su.total(ha) / su.nh
    out["h", "sat"] = su.total(torch.gt(ha, HIGH, out=ha)) / su.nh
    if cell is not None:
        c, tc = cell
        tca = tc.abs()
        out["c", "sat"] = su.total(torch.gt(tca, HIGH, out=tca)) / su.n
        ca = c.abs()
        out["c", "absmean"] = su.total(ca) / su.n
        out["c", "absmax"] = ca.amax() if mask is None else (ca * mask[..., None]).amax()
    return out


class ThroughTime(NamedTuple):
    """The gradient through time of one layer-direction."""

    curve: Tensor  # (T,) |dL/dh_t| over the sample, in real time
    ratio: Tensor  # 0-d: first-processed over last-processed step; NaN when the last got no gradient
    decay: Tensor  # 0-d: log10 of the ratio per step


def through_time(grads: Tensor, mask: Tensor, reverse: bool) -> ThroughTime:
    """Gradient through time from dL/dh_t (B, T, H) over the valid steps of mask (B, T).

    'First' is the step the recurrence processed first (t=0 forward, the last valid step in
    reverse): its gradient travelled furthest back, so the ratio measures the memory horizon.
    """
    g = grads.detach()
    per = g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum(-1) * mask  # (B, T) squared norms
    curve = per.sum(0).sqrt()  # (T,)
    lengths = mask.sum(1)  # (B,)
    b = torch.arange(per.shape[0], device=per.device)
    end = (lengths - 1).clamp_min(0)
    first, last = (per[b, end], per[:, 0]) if reverse else (per[:, 0], per[b, end])
    last = last.sum().sqrt()
    # No gradient at the last step (a direction or layer the loss reaches elsewhere): no ratio.
    ratio = torch.where(last > 0, first.sum().sqrt() / last.clamp_min(1e-30), math.nan)
    span = (lengths.float().mean() - 1).clamp_min(1)
    decay = torch.log10(ratio.clamp_min(1e-30)) / span
    return ThroughTime(curve, ratio, decay)


def sumsq_blocks(g: Tensor, blocks: int) -> Tensor:
    """Squared norm of each of `blocks` equal row blocks of a gradient: (blocks,)."""
    return g.detach().float().pow(2).reshape(blocks, -1).sum(1)


def first_nonfinite(first: Tensor, finite: Tensor, step: int) -> Tensor:
    """Keep the earliest step at which `finite` was False; `first` is +inf until then."""
    return torch.where(finite, first, first.clamp(max=step))


def to_host(items: dict[str, Tensor]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Move every statistic to the host in one transfer: 0-d tensors become stats, 1-d curves."""
    if not items:
        return {}, {}
    # Grouped by device and dtype, a few ops whatever the number of statistics (on a CPU each op costs
    # microseconds): one cat per group, widened to float64 once.
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for k, t in items.items():
        groups.setdefault((t.device, t.dtype), []).append(k)
    keys = [k for ks in groups.values() for k in ks]
    sizes = [items[k].numel() for k in keys]
    dev = items[keys[0]].device
    with torch.no_grad():
        parts = [torch.cat([items[k].reshape(-1) for k in ks]).double().to(dev, non_blocking=True)
                 for ks in groups.values()]
        cat = parts[0] if len(parts) == 1 else torch.cat(parts)
    if cat.is_cuda:
        # One copy into pinned memory queued behind the statistics, then a wait on this stream alone.
        host = torch.empty(cat.shape, dtype=cat.dtype, pin_memory=True)
        host.copy_(cat, non_blocking=True)
        torch.cuda.current_stream(cat.device).synchronize()
        values = host.tolist()
    else:
        values = cat.tolist()  # the one host sync of a logging step
    stats, curves, pos = {}, {}, 0
    for k, n, t in zip(keys, sizes, (items[k] for k in keys)):
        chunk = values[pos:pos + n]
        pos += n
        if t.dim() == 0:
            stats[k] = chunk[0]
        else:
            curves[k] = chunk
    return stats, curves
