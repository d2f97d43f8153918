"""What both recipes' training steps share: micro-batching under DDP, guarded optimiser steps and learning-rate
scaling. Pure PyTorch; ``torch.distributed`` only through DDP's own ``no_sync``.

Gradient accumulation splits a worker's batch into ``k`` micro-batches; every backward but the step's last runs under
DDP's ``no_sync`` (gradients pile up locally), the last one all-reduces the sum once. Each micro-batch's loss is
divided by ``k``, so the optimiser sees the full batch's mean gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def micro_batches(n: int, k: int, group: int | None = None) -> list[torch.Tensor]:
    """Index tensors splitting a batch of ``n`` into ``k`` equal micro-batches.

    ``group``: a minibatch-stddev group size. StyleGAN2's D groups samples i, i + n/g, i + 2n/g, … (a strided
    reshape), so micro-batches take the same columns of that (g, n/g) layout: each micro-batch then holds whole
    groups and D's output equals the full-batch pass sample for sample.
    """
    if k < 1 or n % k:
        raise ValueError(f"batch of {n} cannot be split into {k} equal micro-batches; use a divisor of {n}")
    size = n // k
    g = min(group, n) if group else 1
    if g > 1 and n % g == 0 and size % g == 0 and min(group, size) == g:
        cols = torch.arange(n).view(g, n // g)
        return [part.reshape(-1) for part in cols.split(size // g, dim=1)]
    return list(torch.arange(n).split(size))


def sync_if(module: nn.Module, last: bool):
    """DDP all-reduces on the last backward of a step only; a plain module (one worker) has nothing to defer."""
    if last:
        return contextlib.nullcontext()
    return getattr(module, "no_sync", contextlib.nullcontext)()


def sign_accuracy(real_logits: Any, fake_logits: Any) -> float:
    """Fraction of D's decisions on the right side of 0: (#[D(x) > 0] + #[D(G(z)) < 0]) / (#real + #fake).

    Takes tensors (any shape, any device), arrays or sequences of logits; 0.5 is chance, 1.0 a D that separates
    every real from every fake. Logits of exactly 0 count as wrong.
    """
    real = torch.as_tensor(real_logits).detach().flatten()
    fake = torch.as_tensor(fake_logits).detach().flatten()
    n = real.numel() + fake.numel()
    if n == 0:
        raise ValueError("sign_accuracy needs at least one logit")
    return float(((real > 0).sum() + (fake < 0).sum()).item()) / n


def grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """Total L2 norm of the ``.grad`` of ``parameters`` (those without a grad are skipped): ``health/grad_norm_*``.

    NaN/inf when any gradient holds one (the nonfinite rule catches it); 0.0 when no parameter has a gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def guarded_step(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> tuple[float, bool]:
    """Steps ``opt`` only if every gradient is finite. Returns (total gradient L2 norm, stepped).

    A NaN/inf gradient would poison Adam's moments for good; skipping the step keeps the weights healthy and the
    health monitor sees the flag. Under DDP the gradients are already all-reduced, so every rank decides alike.
    """
    norm = grad_norm(params)
    if math.isfinite(norm):
        opt.step()
        return norm, True
    opt.zero_grad(set_to_none=True)
    return norm, False


class LrScale:
    """Scales every param group's learning rate relative to the one it had at construction (the recipe's base lr,
    already rescaled for lazy regularisation where that applies). Rollbacks of the health guard use it."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts
        self.base = [[g["lr"] for g in opt.param_groups] for opt in opts]
        self.scale = 1.0

    def set(self, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"learning-rate scale {scale!r} not supported; valid: > 0")
        for opt, base in zip(self.opts, self.base, strict=True):
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * scale
        self.scale = float(scale)
