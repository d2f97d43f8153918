"""Health signals the loop computes itself, besides the ones the recipes measure (``gan_models.steps.grad_norm``,
``sign_accuracy``): plotted and recorded, no rule watches them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def ema_drift(G: torch.nn.Module, G_ema: torch.nn.Module) -> float:
    """Relative L2 distance of G_ema's parameters from G's: ‖θ_G − θ_ema‖ / ‖θ_G‖ over every parameter (buffers
    excluded), in float64. 0 while the EMA only copies G; a steady small value while both learn; a jump when G moves
    away faster than the average follows (a divergence, or an lr too high for the EMA's half-life)."""
    with torch.no_grad():
        p64 = [p.detach().double() for p in G.parameters()]
        q64 = [q.detach().double() for q in G_ema.parameters()]
        if len(p64) != len(q64):
            raise ValueError(f"G has {len(p64)} parameters, G_ema {len(q64)}")
        # foreach norms, one read from the device for both sums (not two per parameter)
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(p64, q64))).square().sum()
        total = torch.stack(torch._foreach_norm(p64)).square().sum()
        diff, total = torch.stack([diff, total]).tolist()
    return math.sqrt(diff) / math.sqrt(total) if total > 0 else 0.0


def loss_ratio(signals: Mapping[str, float]) -> float | None:
    """``loss/G`` ÷ ``loss/D`` (``health/loss_ratio``): how much harder G's objective is than D's. It grows while D
    wins (for hinge and logistic losses loss/D ≥ 0 and heads to 0 when D separates everything); its sign is G's
    loss's (a hinge G loss is −D(G(z)), negative once G fools D). None when either loss is missing or loss/D is 0."""
    g, d = signals.get("loss/G"), signals.get("loss/D")
    if g is None or d is None or d == 0 or not (math.isfinite(g) and math.isfinite(d)):
        return None
    return float(g) / float(d)
