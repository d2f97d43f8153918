"""Keeping data-parallel replicas identical, and proving it.

DDP all-reduces gradients, so parameters stay equal, but buffers drift: BatchNorm running statistics are updated
from each rank's own batch, and G_ema copies G's buffers. DDP itself re-broadcasts rank 0's buffers at the start of
the next forward; we do the same explicitly at every tick, before anything reads them (samples, FID, checkpoints).
``assert_in_sync`` then compares a fingerprint of every tensor across ranks and fails loudly on any difference.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """More than one rank in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj, src: int = 0):
    """``src``'s ``obj`` on every rank (any picklable value); itself on a single process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(modules: dict[str, nn.Module], src: int = 0) -> None:
    if not active():
        return
    for module in modules.values():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def fingerprint(modules: dict[str, nn.Module]) -> dict[str, str]:
    """sha256 (16 hex digits) of every parameter and buffer, by qualified name."""
    out = {}
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            data = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (step counters) cannot be viewed
            out[f"{name}.{key}"] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def assert_in_sync(modules: dict[str, nn.Module]) -> dict[str, str]:
    """Raise if any rank's parameters or buffers differ from rank 0's; returns this rank's fingerprint."""
    mine = fingerprint(modules)
    if not active():
        return mine
    every: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        diff = sorted(k for k in mine if theirs.get(k) != every[0].get(k))
        if diff:
            raise RuntimeError(f"DDP replicas diverged: rank {rank} differs from rank 0 in {len(diff)} tensors, "
                               f"e.g. {', '.join(diff[:5])}")  # fmt: skip
    return mine
