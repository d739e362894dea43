"""Statistics as device tensors, and the one transfer that brings them to the host.

Every function here returns 0-d or 1-d tensors on the device of its input and never
reads a value back: the transfer in `to_host` is the only place that waits on the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOW, HIGH = 0.1, 0.9  # saturation bounds of Karpathy, Johnson and Fei-Fei (2015)
INF = math.inf


def masked_mean(x: Tensor, fm: Tensor) -> Tensor:
    """Mean of x (..., B, T, H) over the steps where fm (B, T, 1) is 1."""
    n = fm.sum() * x.shape[-1]
    return (x * fm).sum(dim=(-3, -2, -1)) / n.clamp_min(1)


def sigmoid_gate_stats(gates: Tensor, fm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, left-saturated and right-saturated fractions of stacked gates (K, B, T, H)."""
    return (
        masked_mean(gates, fm),
        masked_mean((gates < LOW).to(fm.dtype), fm),
        masked_mean((gates > HIGH).to(fm.dtype), fm),
    )


def tanh_sat(x: Tensor, fm: Tensor) -> Tensor:
    """Fraction of |x| > 0.9 on the tanh scale, over valid steps."""
    return masked_mean((x.abs() > HIGH).to(fm.dtype), fm)


def data_stats(x: Tensor, mask: Tensor, packed: bool) -> dict[str, Tensor]:
    """Input statistics of (B, T, F) over the valid steps: scale, per-feature spread, trailing zeros."""
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


def gate_stats(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, h: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Gate, cell and hidden statistics of one LSTM layer-direction; all inputs (B, T, H)."""
    fm = mask[..., None].to(i.dtype)
    mean, left, right = sigmoid_gate_stats(torch.stack((i, f, o)), fm)  # each (3,)
    out = {}
    for k, gate in enumerate(("input", "forget", "output")):
        out[f"{gate}/mean"], out[f"{gate}/sat_left"], out[f"{gate}/sat_right"] = mean[k], left[k], right[k]
    out["cell/mean"] = masked_mean(g, fm)
    out["cell/sat"] = tanh_sat(g, fm)
    out["c/sat"] = tanh_sat(torch.tanh(c), fm)
    out["c/absmean"] = masked_mean(c.abs(), fm)
    out["c/absmax"] = (c.abs() * fm).amax()
    out["h/sat"] = tanh_sat(h, fm)
    out["h/absmean"] = masked_mean(h.abs(), fm)
    return out


def gru_gate_stats(r: Tensor, z: Tensor, n: Tensor, h: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Gate and hidden statistics of one GRU layer-direction; all inputs (B, T, H)."""
    fm = mask[..., None].to(r.dtype)
    mean, left, right = sigmoid_gate_stats(torch.stack((r, z)), fm)
    out = {}
    for k, gate in enumerate(("reset", "update")):
        out[f"{gate}/mean"], out[f"{gate}/sat_left"], out[f"{gate}/sat_right"] = mean[k], left[k], right[k]
    out["new/mean"] = masked_mean(n, fm)
    out["new/sat"] = tanh_sat(n, fm)
    out["h/sat"] = tanh_sat(h, fm)
    out["h/absmean"] = masked_mean(h.abs(), fm)
    return out


def through_time(grads: Tensor, mask: Tensor, reverse: bool) -> dict[str, Tensor]:
    """Gradient through time from dL/dh_t (B, T, H): the curve, first-to-last ratio (NaN when the last
    step got no gradient), decay per step.

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
    return {"gtt": curve, "gtt/ratio": ratio, "gtt/decay": decay}


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
    keys = list(items)
    flat = [items[k].detach().reshape(-1).double() for k in keys]
    sizes = [t.numel() for t in flat]
    devices = {t.device for t in flat}
    if len(devices) > 1:  # statistics of modules on several devices: gather them on the first
        dev = flat[0].device
        flat = [t.to(dev, non_blocking=True) for t in flat]
    flat = torch.cat(flat)
    if flat.is_cuda:
        # One copy into pinned memory queued behind the statistics, then a wait on this stream alone.
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        values = host.tolist()
    else:
        values = flat.tolist()  # the one host sync of a logging step
    stats, curves, pos = {}, {}, 0
    for k, n, t in zip(keys, sizes, (items[k] for k in keys)):
        chunk = values[pos:pos + n]
        pos += n
        if t.dim() == 0:
            stats[k] = chunk[0]
        else:
            curves[k] = chunk
    return stats, curves
