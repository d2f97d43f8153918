"""Generator weight averaging (EMA) and the parameter freezing the training phases share."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def make_ema(G: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of G."""
    ema = copy.deepcopy(G).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, G: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·G for parameters; buffers (BN stats, SN vectors, w_avg) are copied."""
    for p_ema, p in zip(ema.parameters(), G.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)


def halflife_decay(batch_size: int, halflife_kimg: float, rampup: float | None, cur_nimg: int) -> float:
    """StyleGAN2's EMA decay: a half-life measured in thousands of images, optionally ramped up early in training."""
    halflife_nimg = halflife_kimg * 1000
    if rampup is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` do not require grad inside the block (gradients still flow through its inputs):
    the G phase's D forward skips D's weight gradients, as NVlabs does."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)
