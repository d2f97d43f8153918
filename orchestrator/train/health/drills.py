"""Fire drills: a fault injected on purpose (``health.fire_drill``), so a team can watch the divergence guard act on
a real cluster before it matters. A drill fires once per run; a rollback to a checkpoint before its step does not
fire it again (the loop keeps that flag)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gan_models.protocol import Recipe

FIRE_DRILLS = ("lr_spike", "nan")


@dataclass(frozen=True)
class FireDrill:
    """``kind`` in ``FIRE_DRILLS``, applied once ``step`` steps are done; ``factor`` is the lr multiplier of an
    ``lr_spike``."""

    kind: str
    step: int
    factor: float = 1.0

    def describe(self) -> str:
        if self.kind == "lr_spike":
            return f"learning rates × {self.factor:.4g} after step {self.step}"
        return f"NaN written into a G weight after step {self.step}"

    def apply(self, recipe: Recipe, lr_scale: float) -> None:
        """Inject the fault into ``recipe``; identical on every rank, as a real fault under DDP. ``lr_spike``
        multiplies the current learning-rate scale (until the guard's rollback resets it); ``nan`` fills G's first
        weight tensor, so every sample's forward is poisoned."""
        if self.kind == "lr_spike":
            recipe.set_lr_scale(lr_scale * self.factor)
        else:
            with torch.no_grad():
                next(recipe.G.parameters()).fill_(math.nan)


def parse_fire_drill(spec: str) -> FireDrill | None:
    """``"lr_spike@200x1e4"`` → FireDrill("lr_spike", 200, 1e4); ``"nan@200"`` → FireDrill("nan", 200); ``""`` →
    None. ValueError (one line, naming the valid forms) on anything else."""
    spec = (spec or "").strip()
    if not spec:
        return None
    valid = "'lr_spike@STEPxFACTOR' (e.g. lr_spike@200x1e4, FACTOR > 1) or 'nan@STEP' (STEP ≥ 1), or '' for none"
    kind, _, rest = spec.partition("@")
    step_text, _, factor_text = rest.partition("x")
    try:
        step = int(step_text)
        if kind == "lr_spike":
            factor = float(factor_text)
            ok = factor > 1 and math.isfinite(factor)
        else:
            factor, ok = 1.0, kind == "nan" and not factor_text
    except ValueError:
        ok = False
    if not ok or step < 1:
        raise ValueError(f"health.fire_drill={spec!r} is invalid; expected {valid}")
    return FireDrill(kind, step, factor)
