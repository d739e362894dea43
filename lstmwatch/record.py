"""Record: what one logging step measured, as plain floats, with accessors that read its keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import keys
from .keys import Key


@dataclass
class Record:
    """What one logging step measured: plain floats, no tensors."""

    step: int
    loss: float | None  # the loss passed to this step
    stats: dict[str, float]  # 'module/l0/forget/sat_right' -> value; keys without '/' are run-wide
    curves: dict[str, list[float]] = field(default_factory=dict)  # 'module/gtt' -> per-timestep norms
    val_loss: float | None = None
    modules: tuple[str, ...] = ()

    def _keys(self) -> dict[str, Key]:
        # Not kept on the record (thousands of records stay in memory); keys.parse caches each key once.
        return {k: keys.parse(k, self.modules) for k in self.stats}

    def get(self, key: str) -> float | None:
        """One statistic by its full key, or None."""
        return self.stats.get(key)

    def of(self, module: str) -> dict[str, float]:
        """The statistics of one module, keys without the module prefix."""
        p = module + "/"
        return {k[len(p):]: v for k, v in self.stats.items() if k.startswith(p)}

    def module_stat(self, module: str, stat: str) -> float | None:
        """A module-level statistic: 'grad_norm', 'grads_seen', 'gtt/gain', 'data/pad_frac'."""
        return self.stats.get(keys.module_key(module, stat))

    def layers(self, module: str, stat: str | None = None) -> list[str]:
        """Layer-direction labels of a module in this record ('l0', 'l0_reverse', 'l1', ...), in order;
        with `stat`, only those that have it ('grad_norm', 'forget/sat_right')."""
        found = {k.layer for k in self._keys().values() if k.module == module and k.layer}
        if stat is not None:
            found = {lab for lab in found if keys.layer_key(module, lab, stat) in self.stats}
        return sorted(found, key=keys.layer_order)

    def layer_stat(self, module: str, layer: str, stat: str) -> float | None:
        """A layer-direction's statistic: 'grad_norm', 'update_ratio', 'forget/sat_right', 'gtt/ratio'."""
        return self.stats.get(keys.layer_key(module, layer, stat))

    def gates(self, module: str, layer: str) -> list[str]:
        """The gates and states (c, h) with statistics in a layer-direction, in the order first seen."""
        out: dict[str, None] = {}
        for k in self._keys().values():
            if k.kind == "gate" and k.module == module and k.layer == layer:
                out.setdefault(k.group)
        return list(out)

    def layer_norms(self, module: str) -> dict[int, float]:
        """Gradient norm of each layer of a module, both directions together."""
        out: dict[int, float] = {}
        for lab in self.layers(module, "grad_norm"):
            v = self.layer_stat(module, lab, "grad_norm")
            if v is not None:
                k = keys.layer_index(lab)
                out[k] = math.sqrt(out.get(k, 0.0) ** 2 + v * v)
        return out

    def update_ratios(self, module: str | None = None) -> list[float]:
        """Finite update-to-weight ratios of every layer-direction of a module (or of all)."""
        return [v for key, k in self._keys().items()
                if k.kind == "layer" and k.stat == "update_ratio" and (module is None or k.module == module)
                and (v := self.stats[key]) is not None and math.isfinite(v)]

    def max_update_ratio(self, module: str | None = None) -> float | None:
        """The largest update-to-weight ratio of a module (or of all), if this record measured it."""
        vals = self.update_ratios(module)
        return max(vals) if vals else None

    def param_norms(self, module: str) -> dict[str, float]:
        """Gradient norm of each parameter of a module, by parameter name."""
        return {k.group: self.stats[key] for key, k in self._keys().items()
                if k.kind == "param" and k.module == module and k.stat == "grad_norm"}

    def nonfinite(self) -> list[tuple[float, str, str]]:
        """Sites where a NaN or Inf has appeared: (first step, module or '' for the loss, site), in no order.

        Sites: 'loss', 'data', 'gates', 'grad/<parameter>'.
        """
        out = [(v, k.module, k.stat) for key, k in self._keys().items() if k.kind == "nonfinite"
               and (v := self.stats[key]) is not None and math.isfinite(v)]
        loss = self.stats.get(keys.NONFINITE_LOSS)
        if loss is not None and math.isfinite(loss):
            out.append((loss, "", "loss"))
        return out

    def curve(self, module: str, layer: str | None = None) -> list[float] | None:
        """The gradient-through-time curve of a module (its top layer) or of one layer-direction."""
        return self.curves.get(keys.gtt_key(module, layer))

    def has_internals(self) -> bool:
        """Whether this record holds recomputed gates (a validation-only record does not)."""
        return any(k.kind == "gate" and k.group == "h" and k.stat == "sat" for k in self._keys().values())
