"""What both recipes' training steps share: micro-batching under DDP, guarded optimiser steps and learning-rate
scaling. Pure PyTorch; ``torch.distributed`` only through DDP's own ``no_sync``.

Gradient accumulation splits a worker's batch into ``k`` micro-batches; every backward but the step's last runs under
DDP's ``no_sync`` (gradients pile up locally), the last one all-reduces the sum once. Each micro-batch's loss is
divided by ``k``, so the optimiser sees the full batch's mean gradient.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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


def sign_accuracy(real_logits: Any, fake_logits: Any) -> torch.Tensor:
    """Fraction of D's decisions on the right side of 0: (#[D(x) > 0] + #[D(G(z)) < 0]) / (#real + #fake).

    Takes tensors (any shape, any device), arrays or sequences of logits; 0.5 is chance, 1.0 a D that separates
    every real from every fake. Logits of exactly 0 count as wrong. A 0-d float32 tensor on the logits' device: the
    training step reads nothing back from the device (see ``guarded_step``).
    """
    real = torch.as_tensor(real_logits).detach().flatten()
    fake = torch.as_tensor(fake_logits).detach().flatten()
    n = real.numel() + fake.numel()
    if n == 0:
        raise ValueError("sign_accuracy needs at least one logit")
    return ((real > 0).sum() + (fake < 0).sum()).float() / n


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Total L2 norm of the ``.grad`` of ``parameters`` (those without a grad are skipped): ``health/grad_norm_*``.

    A 0-d float32 tensor on the gradients' device, from one foreach kernel (not a kernel per parameter); NaN/inf when
    any gradient holds one (the nonfinite rule catches it); 0 when no parameter has a gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros([])
    return torch.nn.utils.get_total_norm(grads).float()


def guarded_step(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> tuple[torch.Tensor, bool]:
    """Steps ``opt`` only if every gradient is finite. Returns (total gradient L2 norm as a 0-d tensor, stepped).

    A NaN/inf gradient would poison Adam's moments for good; skipping the step keeps the weights healthy and the
    health monitor sees the flag. Under DDP the gradients are already all-reduced, so every rank decides alike. The
    finiteness test is the step's one read from the device (a host sync on GPU); every other step metric stays a
    device tensor until the loop reads a tick's worth at once.
    """
    norm = grad_norm(params)
    if bool(torch.isfinite(norm)):
        opt.step()
        return norm, True
    opt.zero_grad(set_to_none=True)
    return norm, False


def read_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A step's (or a tick's) metrics as Python floats: tensors are read back in one transfer per device."""
    on: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            on.setdefault(v.device, []).append(k)
    read = {}
    for keys in on.values():
        values = torch.stack([metrics[k].detach().double().reshape(()) for k in keys]).tolist()
        read.update(zip(keys, values, strict=True))
    return {k: read[k] if k in read else float(v) for k, v in metrics.items()}


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict(state)`` with Adam's ``step`` counters on the CPU, wherever the state was loaded to.

    Non-capturable, non-fused Adam keeps ``step`` where the state dict put it, and reads it once per parameter in
    every step (``beta ** step``): a checkpoint loaded with ``map_location=cuda`` would cost two host syncs per
    parameter tensor per step, for the rest of the run."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue  # these keep step on the parameters' device by design
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                opt.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)  # one read, at load time


@dataclass
class HostReads:
    """What ``count_host_reads`` saw: ``count`` reads, by kind (``item``, ``__float__``, …) and by ``file:line``."""

    kinds: Counter = field(default_factory=Counter)
    sites: Counter = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def top(self, n: int = 5) -> list[str]:
        return [f"{site} ×{k}" for site, k in self.sites.most_common(n)]


_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads(*optimizers: torch.optim.Optimizer) -> Iterator[HostReads]:
    """Counts reads of tensor values into Python (``item``, ``float``/``int``/``bool`` of a tensor, ``tolist``)
    inside the block, torch's own Python code included: each is a host sync when the tensor lives on a GPU.

    On the CPU nothing syncs, so this is how a test on the CPU sees what a GPU step would wait for. Reads of the
    ``optimizers``' ``step`` counters are not counted: non-capturable Adam reads them once per parameter by design,
    and they live on the CPU (``load_optimizer_state`` keeps them there), where no read syncs."""
    reads = HostReads()
    own = {name: torch.Tensor.__dict__.get(name) for name in _READS}  # most are inherited from the C base class
    busy = threading.local()  # a read made inside another (a Python-level override) counts once

    def counted(name, fn):
        def read(self, *args, **kwargs):
            if getattr(busy, "on", False) or _is_step(self, optimizers):
                return fn(self, *args, **kwargs)
            caller = sys._getframe(1)
            reads.kinds[name] += 1
            reads.sites[f"{caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            busy.on = True
            try:
                return fn(self, *args, **kwargs)
            finally:
                busy.on = False

        return read

    for name in _READS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        yield reads
    finally:
        for name in _READS:
            if own[name] is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, own[name])


def _is_step(t: torch.Tensor, optimizers) -> bool:
    """Whether ``t`` is one of the optimisers' step counters (Adam makes them lazily, at its first step)."""
    return any(st.get("step") is t for opt in optimizers for st in opt.state.values())


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
