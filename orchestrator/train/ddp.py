"""Keeping data-parallel replicas identical, and proving it.

DDP all-reduces gradients, so parameters stay equal, but buffers drift: BatchNorm running statistics are updated
from each rank's own batch, and G_ema copies G's buffers. DDP itself re-broadcasts rank 0's buffers at the start of
the next forward; we do the same explicitly at every tick, before anything reads them (samples, FID, checkpoints).
``assert_in_sync`` then compares a fingerprint of every tensor across ranks and fails loudly on any difference.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gan_models.steps import read_metrics


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
            raise RuntimeError(
                f"DDP replicas diverged: rank {rank} differs from rank 0 in {len(diff)} tensors, "
                f"e.g. {', '.join(diff[:5])}"
            )
    return mine


def reduce_tick(sums: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, float]:
    """The tick's mean of every signal over all steps of all ranks (Σ values / Σ counts, float64), identical on
    every rank, so every rank's health monitor reaches the same verdict. A NaN/inf on one rank makes the mean
    non-finite everywhere. A signal only some ranks reported is averaged over the steps that reported it.

    ``sums`` hold Python floats or 0-d device tensors (the recipes keep step metrics on the device): they are read
    back here once per tick, in one transfer, not once per metric per step."""
    if not active():
        return read_metrics({k: v / counts[k] for k, v in sums.items()})
    every: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(sums))
    keys = sorted(set().union(*every))
    if not keys:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).to(device).reshape(()) for k in keys]
    steps = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device)
    t = torch.cat([torch.stack(values), steps])
    dist.all_reduce(t)
    n = len(keys)
    return dict(zip(keys, (t[:n] / t[n:]).tolist(), strict=True))


class TickStats:
    """The step metrics of one tick, summed on the device; ``reduce()`` is the tick's collective mean."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, step_metrics: Mapping[str, Any]) -> None:
        for k, v in step_metrics.items():  # phases like G or R1 steps report only when they run
            self.sums[k] += v
            self.counts[k] += 1

    def reduce(self) -> dict[str, float]:
        return reduce_tick(self.sums, self.counts)

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()
