"""Statistic names: every key of a Record is built and read here, with how each statistic combines.

A key is slash-separated: run-wide statistics have one part (`loss`, `grad_norm`); a module's start with its
qualified name, then a layer-direction label, a gate, a group or a parameter name, then the statistic:

    encoder.lstm/l0/forget/sat_right      gate statistic of layer 0, forward direction
    encoder.lstm/l1_reverse/grad_norm     layer statistic (reverse direction of layer 1)
    encoder.lstm/data/pad_frac            input statistic of the module
    encoder.lstm/gtt/gain                 gradient through time of the module (top layer)
    encoder.lstm/weight_ih_l0/grad_norm   parameter statistic
    encoder.lstm/nonfinite/grad/bias_hh_l0   first step a NaN or Inf appeared at a site

These strings are a public contract (W&B dashboards and saved run logs read them): change them only with
a compatibility path.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import NamedTuple

# --- run-wide statistics (no module)
LOSS = "loss"  # the loss passed to the logging step
LOSS_MEAN = "loss_mean"  # mean loss over the steps since the previous record
NONFINITE_LOSS = "nonfinite_loss"  # first step the loss was NaN or Inf
VAL_LOSS = "val_loss"
GRAD_NORM = "grad_norm"  # over every watched module
RUN_WIDE = (LOSS, LOSS_MEAN, NONFINITE_LOSS, VAL_LOSS, GRAD_NORM)

# --- groups inside a module
DATA = "data"
NONFINITE = "nonfinite"
GTT = "gtt"
# Module-level statistics that are not a layer's (a layer label never takes these names).
MODULE_STATS = ("grad_norm", "grads_seen", "trainable")
# Non-finite sites, in the order values are produced within a step: the earliest is the root.
SITES = ("data", "gates", "loss", "grad")
# Sigmoid gates (mean, sat_left, sat_right) and tanh-valued quantities (sat) per layer-direction.
SIGMOID_STATS = ("mean", "sat_left", "sat_right")
STATES = ("c", "h")  # the cell output tanh(c) and the hidden state

_LAYER = re.compile(r"^l(\d+)(_reverse)?$")
# A parameter's layer-direction: weight_hh_l0, bias_ih_l1_reverse, parametrizations.weight_hh_l0.original0.
_PARAM_LAYER = re.compile(r"_(l\d+(?:_reverse)?)(?:\.original\d*)?$")


class Combine(Enum):
    """How a statistic combines over samples, records or ranks."""

    SUM = "sum"
    MEAN = "mean"  # weighted by its count (valid values, samples)
    MAX = "max"
    MIN = "min"
    NORM = "norm"  # sqrt of the sum of squares: gradient norms
    FIRST = "first"  # the earliest step: non-finite sites
    LAST = "last"  # a value every rank knows alike (the loss passed to the step)


# The last part of a key -> how it combines. Ratios of norms combine as the mean of their parts' ratios.
COMBINE: dict[str, Combine] = {
    "mean": Combine.MEAN, "std": Combine.MEAN, "sat": Combine.MEAN, "sat_left": Combine.MEAN,
    "sat_right": Combine.MEAN, "absmean": Combine.MEAN, "pad_frac": Combine.MEAN, "absmax": Combine.MAX,
    "feat_mean_absmax": Combine.MAX, "feat_std_max": Combine.MAX, "feat_std_min": Combine.MIN,
    "grad_norm": Combine.NORM, "gtt": Combine.NORM, "update_ratio": Combine.MAX, "ratio": Combine.MEAN,
    "decay": Combine.MEAN, "gain": Combine.MAX, "grads_seen": Combine.MIN, "trainable": Combine.MIN,
    "loss": Combine.MEAN, "loss_mean": Combine.MEAN, "val_loss": Combine.MEAN, "nonfinite_loss": Combine.FIRST,
}


def combine_of(key: str) -> Combine:
    """How the statistic under `key` combines over samples and ranks."""
    if parse(key).group == NONFINITE:
        return Combine.FIRST
    return COMBINE.get(key.rsplit("/", 1)[-1], Combine.MEAN)


# --- layer-direction labels
def layer_label(layer: int, reverse: bool = False) -> str:
    """'l0', 'l1_reverse'."""
    return f"l{layer}" + ("_reverse" if reverse else "")


def is_layer(label: str) -> bool:
    """Whether a key part is a layer-direction label."""
    return _LAYER.match(label) is not None


def layer_index(label: str) -> int:
    """The layer number of a label: 'l1_reverse' -> 1."""
    m = _LAYER.match(label)
    if m is None:
        raise ValueError(f"not a layer label: {label!r}")
    return int(m.group(1))


def is_reverse(label: str) -> bool:
    """Whether a label names a reverse direction."""
    return label.endswith("_reverse")


def layer_order(label: str) -> tuple[int, bool]:
    """Sort key of layer labels: by layer, forward before reverse."""
    return layer_index(label), is_reverse(label)


def param_layer(pname: str) -> str:
    """The layer-direction a parameter belongs to ('l0' for a cell's weight_ih)."""
    m = _PARAM_LAYER.search(pname)
    return m.group(1) if m else "l0"


# --- builders
def module_key(module: str, stat: str) -> str:
    """A module-level statistic: 'lstm/grad_norm', 'lstm/gtt/gain'."""
    return f"{module}/{stat}"


def layer_key(module: str, layer: str, stat: str) -> str:
    """A layer-direction statistic: 'lstm/l0/update_ratio', 'lstm/l0/forget/sat_right'."""
    return f"{module}/{layer}/{stat}"


def gate_key(module: str, layer: str, gate: str, stat: str) -> str:
    """A gate (or state c, h) statistic of a layer-direction: 'lstm/l0/forget/sat_right'."""
    return f"{module}/{layer}/{gate}/{stat}"


def param_key(module: str, pname: str, stat: str = "grad_norm") -> str:
    """A parameter statistic: 'lstm/weight_ih_l0/grad_norm'."""
    return f"{module}/{pname}/{stat}"


def data_key(module: str, stat: str) -> str:
    """An input statistic: 'lstm/data/pad_frac'."""
    return f"{module}/{DATA}/{stat}"


def nonfinite_key(module: str, site: str) -> str:
    """First non-finite step at a site ('data', 'gates', 'grad/<param>'): 'lstm/nonfinite/data'."""
    return f"{module}/{NONFINITE}/{site}"


def gtt_key(module: str, layer: str | None = None, stat: str = "") -> str:
    """Gradient through time: the curve ('lstm/gtt', 'lstm/l0/gtt') or a summary ('lstm/gtt/ratio')."""
    base = f"{module}/{layer}/{GTT}" if layer else f"{module}/{GTT}"
    return f"{base}/{stat}" if stat else base


def prefixed(module: str, layer: str | None, stats: dict) -> dict:
    """Keys of a probe's statistics under a module and, if given, a layer-direction: {'forget/mean': v}
    -> {'lstm/l0/forget/mean': v}."""
    base = f"{module}/{layer}/" if layer else f"{module}/"
    return {base + k: v for k, v in stats.items()}


# --- reading
class Key(NamedTuple):
    """A key split into its parts; `module` is '' for run-wide statistics.

    kind: 'run', 'module' (grad_norm, grads_seen, trainable), 'layer', 'gate' (a gate or state c/h of a
    layer), 'data', 'gtt' (module level), 'nonfinite', or 'param'.
    """

    kind: str
    module: str
    layer: str  # '' unless the key is a layer-direction's
    group: str  # gate, state, 'data', 'gtt', 'nonfinite' or parameter name; '' if none
    stat: str  # the statistic: 'sat_right', 'grad_norm', a non-finite site ('grad/weight_hh_l0')


def parse(key: str, modules: tuple[str, ...] | None = None) -> Key:
    """Split a key into its parts; `modules` resolves module names that contain '/' (none do in PyTorch)."""
    return _parse(key, modules)


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred keys come back in every record
def _parse(key: str, modules: tuple[str, ...] | None) -> Key:
    if "/" not in key:
        return Key("run", "", "", "", key)
    module, rest = key.split("/", 1)
    if modules:
        for m in modules:
            if key.startswith(m + "/") and len(m) > len(module):
                module, rest = m, key[len(m) + 1:]
    head, _, tail = rest.partition("/")
    if not tail:
        return Key("module", module, "", "", head)
    if head == NONFINITE:
        return Key("nonfinite", module, "", NONFINITE, tail)
    if head == DATA:
        return Key("data", module, "", DATA, tail)
    if head == GTT:
        return Key("gtt", module, "", GTT, tail)
    if is_layer(head):
        group, _, stat = tail.partition("/")
        if not stat:  # 'l0/grad_norm', 'l0/gtt', 'l0/update_ratio'
            return Key("layer", module, head, "", group)
        if group == GTT:  # 'l0/gtt/ratio'
            return Key("layer", module, head, GTT, stat)
        return Key("gate", module, head, group, stat)
    return Key("param", module, "", head, tail)


def site_of(site: str) -> str:
    """The kind of a non-finite site: 'grad/weight_ih_l0' -> 'grad'."""
    return site.split("/", 1)[0]
