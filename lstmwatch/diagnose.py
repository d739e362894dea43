"""Rank a run's events into root causes, each with the consequences it explains."""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import Event

# What a fault can cause, cause first: an event of a kind on the right is explained by an
# earlier or simultaneous event of the kind on the left in the same module (or a run-wide one).
CAUSES: dict[str, tuple[str, ...]] = {
    "nonfinite": ("exploding_gradient", "diverging_loss", "stalled_loss", "gate_saturation", "hidden_saturation",
                  "vanishing_gradient", "no_gradient", "not_updated"),
    "unnormalized_input": ("gate_saturation", "hidden_saturation", "exploding_gradient", "vanishing_gradient",
                           "stalled_loss", "diverging_loss", "nonfinite"),
    "padding": ("hidden_saturation", "gate_saturation", "vanishing_gradient", "stalled_loss"),
    # Weights blown up by too large a step saturate the gates, whose gradients then vanish or are exactly zero,
    # and make every later update too small for the weights' float resolution: the cause is the step size.
    "exploding_gradient": ("diverging_loss", "nonfinite", "gate_saturation", "hidden_saturation", "stalled_loss",
                           "unnormalized_input", "no_gradient", "vanishing_gradient", "not_updated"),
    "diverging_loss": ("nonfinite", "gate_saturation", "hidden_saturation", "stalled_loss", "unnormalized_input",
                       "no_gradient", "vanishing_gradient", "not_updated"),
    "no_gradient": ("stalled_loss", "not_updated"),
    "not_updated": ("stalled_loss",),
    "vanishing_gradient": ("stalled_loss", "gate_saturation"),
    "gate_saturation": ("vanishing_gradient", "stalled_loss", "hidden_saturation"),
    "hidden_saturation": ("vanishing_gradient", "stalled_loss"),
}
# Root causes first when two findings explain nothing of each other.
PRIORITY = ("nonfinite", "unnormalized_input", "padding", "no_gradient", "not_updated", "exploding_gradient",
            "diverging_loss", "vanishing_gradient", "gate_saturation", "hidden_saturation", "stalled_loss",
            "overfitting")
_SEV = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """A root cause: its first event, how often it was raised, and the events it explains."""

    cause: Event
    count: int = 1
    consequences: list[Event] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The root cause's kind."""
        return self.cause.kind

    @property
    def module(self) -> str:
        """The module of the root cause ('' for the whole run)."""
        return self.cause.module


def _explains(cause: Event, effect: Event) -> bool:
    """Whether `cause` can explain `effect`: by their kinds, places and steps, never by their words."""
    if cause.severity == "info":
        return False  # an observation (a frozen LSTM, say) is not a fault that causes others
    if effect.kind == "nonfinite" and effect.where == "data":
        return False  # first seen in the input batch: it comes from outside training, nothing in the run explains it
    # A non-finite value is the root of everything after it, wherever it first appeared.
    same_place = cause.kind == "nonfinite" or not cause.module or not effect.module or cause.module == effect.module
    if effect.kind == "unnormalized_input" and cause.step >= effect.step:
        # Inputs that grew only after the weights blew up (an embedding or a lower layer trained at too high a
        # learning rate) are a consequence; inputs unnormalized from the start are the root.
        return False
    return same_place and effect.kind in CAUSES.get(cause.kind, ()) and cause.step <= effect.step


def _priority(kind: str) -> int:
    """Rank of a kind as a root cause: lower is more fundamental."""
    return PRIORITY.index(kind) if kind in PRIORITY else len(PRIORITY)


def diagnose(events: list[Event]) -> list[Finding]:
    """Group events by (kind, module); in order of first appearance, hang each group under an earlier
    root that explains it; rank the roots by severity, then by how fundamental their kind is."""
    groups: dict[tuple[str, str], Finding] = {}
    for e in sorted(events, key=lambda e: (e.step, _priority(e.kind))):
        key = (e.kind, e.module)
        if key in groups:
            groups[key].count += 1
        else:
            groups[key] = Finding(e)
    roots: list[Finding] = []
    for f in groups.values():  # insertion order: first step, then priority
        parent = next((r for r in roots if _explains(r.cause, f.cause)), None)
        if parent is None:
            roots.append(f)
        else:
            parent.consequences.append(f.cause)
    return sorted(roots, key=lambda f: (_SEV[f.cause.severity], _priority(f.kind), f.cause.step))


def summary(findings: list[Finding], steps: int = 0, modules: list[str] | None = None) -> str:
    """The diagnosis as text: each root cause with its remedy, consequences indented under it."""
    head = f"lstmwatch: {steps} steps watched" + (f" on {', '.join(modules)}" if modules else "")
    if not findings:
        return head + ": no problem found."
    lines = [head + f": {len(findings)} root cause(s), most likely first."]
    for n, f in enumerate(findings, 1):
        e = f.cause
        where = f" in {e.module}" if e.module else ""
        again = f", raised {f.count} times" if f.count > 1 else ""
        lines.append(f"{n}. [{e.severity}] {e.kind}{where}, from step {e.step}{again}")
        lines.append(f"   {e.message}")
        lines.append(f"   fix: {e.hint}")
        for c in f.consequences:
            lines.append(f"   -> which explains {c.kind}" + (f" in {c.module}" if c.module else "")
                         + f" (step {c.step})")
    return "\n".join(lines)
