"""Fixes that lstmwatch's hints point to and that take more than one line of PyTorch."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["set_forget_bias", "standardize"]


def set_forget_bias(model_or_lstm: nn.Module, value: float = 1.0) -> int:
    """Set the effective forget-gate bias of every nn.LSTM / nn.LSTMCell in a model; returns how many were set.

    PyTorch splits the bias in two (bias_ih + bias_hh, gate order i, f, g, o) and initializes both near 0,
    so the forget gate starts half closed. A bias of 1.0 (Jozefowicz, Zaremba and Sutskever, 2015) lets
    the cell remember from the start. The value goes to bias_ih and bias_hh's forget block is zeroed, so
    the effective bias is exactly `value`.
    """
    n = 0
    with torch.no_grad():
        for m in model_or_lstm.modules():
            if not isinstance(m, (nn.LSTM, nn.LSTMCell)) or not m.bias:
                continue
            h = m.hidden_size
            for name, p in m.named_parameters():
                if name.startswith("bias_ih"):
                    p[h:2 * h].fill_(value)
                elif name.startswith("bias_hh"):
                    p[h:2 * h].zero_()
            n += 1
    if n == 0:
        raise ValueError(f"no nn.LSTM or nn.LSTMCell with a bias found in {type(model_or_lstm).__name__}")
    return n


def standardize(x: torch.Tensor, dims: tuple[int, ...] = (0, 1), eps: float = 1e-8):
    """Standardize features of x (B, T, F) over dims; returns (x_std, mean, std) to reuse on other splits."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + eps), mean, std
