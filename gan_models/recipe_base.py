"""What both training recipes share, so that each recipe file holds only its own losses and phases.

``RecipeBase`` owns the plumbing of ``gan_models.protocol.Recipe``: one setup order (device, memory format, wrapping
for data-parallel training, compilation, optimisers), bf16 autocast, learning-rate scaling, micro-batch index tensors,
and the state of G, D, G_ema and the optimisers. A subclass adds its optimisers, the state it keeps besides those, and
its ``train_step``, ``sample`` and ``latents``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from gan_models.ema import make_ema
from gan_models.protocol import Wrap
from gan_models.steps import LrScale, load_optimizer_state, micro_batches, sign_accuracy

D_STATS = ("loss/D", "D/real", "D/fake", "health/D_sign_acc")


class DStats:
    """The D step's metrics summed over its micro-batches; ``means(k)`` averages them over ``k`` micro-batches."""

    def __init__(self, penalties: list[str]):
        self.sums: dict[str, Any] = dict.fromkeys([*D_STATS, *penalties], 0.0)

    def add(self, loss: torch.Tensor, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        """One micro-batch: its (detached) D loss and logits."""
        self.sums["loss/D"] += loss
        self.sums["D/real"] += real_logits.detach().mean()
        self.sums["D/fake"] += fake_logits.detach().mean()
        self.sums["health/D_sign_acc"] += sign_accuracy(real_logits, fake_logits)

    def add_penalty(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] += value.detach()

    def means(self, k: int) -> dict[str, Any]:
        return {key: v / k for key, v in self.sums.items()}


class RecipeBase(abc.ABC):
    """G, D and G_ema (made here, a frozen copy of G), their optimisers, and the order everything is set up in.

    ``load_state_dict`` works before or after ``setup``: weights load at once; optimiser states (and the lr scale)
    wait for the optimisers ``setup`` builds. ``micro_batch_group``: a minibatch-stddev group size that micro-batches
    keep whole (``gan_models.steps.micro_batches``).
    """

    def __init__(self, cfg: Any, hparams: Any, G: nn.Module, D: nn.Module, micro_batch_group: int | None = None):
        self.cfg, self.hp = cfg, hparams
        self.G, self.D = G, D
        self.G_ema = make_ema(G)
        self.z_dim, self.c_dim = int(G.z_dim), int(G.c_dim)
        self.micro_batch_group = micro_batch_group
        self.device = torch.device("cpu")
        self.amp = False
        self.accumulate = 1
        self.memory_format = torch.contiguous_format
        # Data-parallel twins: *_eager run the penalties (double backward, which compiled graphs cannot), *_train
        # the main passes (compiled with setup(compile=True)).
        self.G_eager: nn.Module = G
        self.D_eager: nn.Module = D
        self.G_train: nn.Module = G
        self.D_train: nn.Module = D
        self.opt_G: torch.optim.Optimizer | None = None
        self.opt_D: torch.optim.Optimizer | None = None
        self.lr_scale: LrScale | None = None
        self._pending_opt: tuple[dict, dict, float] | None = None
        self._parts: dict[int, list[torch.Tensor]] = {}

    # -- what a recipe adds ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _memory_format(self) -> torch.memory_format:
        """The memory format of G, D and G_ema on ``self.device``."""

    @abc.abstractmethod
    def _on_device(self) -> None:
        """Move (or gather) what the recipe keeps besides G, D and G_ema, once those are on ``self.device``."""

    @abc.abstractmethod
    def _optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """(opt_G, opt_D) over the parameters of G and D, at their base learning rates."""

    @abc.abstractmethod
    def _extra_state(self) -> dict[str, Any]:
        """The recipe's own counters and statistics, for ``state_dict``."""

    @abc.abstractmethod
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``_extra_state`` saved."""

    # -- setup -------------------------------------------------------------------------------------------------------

    def setup(
        self, device: torch.device, wrap: Wrap, *, amp: bool = False, accumulate: int = 1, compile: bool = False
    ) -> None:
        self.device = torch.device(device)
        # bf16 has fp32's range, so no loss scaling is needed; AMP is CUDA-only (CPU autocast is slower here).
        self.amp = amp and self.device.type == "cuda"
        self.accumulate = int(accumulate)
        self._parts = {}
        self.memory_format = self._memory_format()
        for m in (self.G, self.D, self.G_ema):
            m.to(self.device, memory_format=self.memory_format)
        self._on_device()
        self.G_eager, self.D_eager = wrap(self.G), wrap(self.D)
        self.G_train = torch.compile(self.G_eager) if compile else self.G_eager
        self.D_train = torch.compile(self.D_eager) if compile else self.D_eager
        self.opt_G, self.opt_D = self._optimizers()
        self.lr_scale = LrScale(self.opt_G, self.opt_D)
        if self._pending_opt is not None:  # a checkpoint loaded before setup
            self._load_optimizers()

    def _require_setup(self) -> None:
        if self.opt_G is None:
            raise RuntimeError("call setup(device, wrap) before train_step")

    # -- helpers of the training steps -------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _d_no_sync(self):
        """D's backwards inside the block keep their gradients local (DDP's ``no_sync``; a plain module has none)."""
        return getattr(self.D_train, "no_sync", contextlib.nullcontext)()

    def _micro_batches(self, n: int) -> list[torch.Tensor]:
        """Micro-batch index tensors on the device, made once per batch size (a copy to the GPU syncs the host)."""
        if n not in self._parts:
            parts = micro_batches(n, self.accumulate, self.micro_batch_group)
            self._parts[n] = [i.to(self.device) for i in parts]
        return self._parts[n]

    # -- learning rates ----------------------------------------------------------------------------------------------

    def base_lrs(self) -> dict[str, float]:
        return {"G": self.hp.g_lr, "D": self.hp.d_lr}

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale.set(scale)

    # -- checkpointing -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        set_up = self.opt_G is not None
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict() if set_up else None,
            "opt_D": self.opt_D.state_dict() if set_up else None,
            "lr_scale": self.lr_scale.scale if set_up else 1.0,
            "config": dataclasses.asdict(self.cfg),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        if state.get("opt_G") is not None:
            self._pending_opt = (state["opt_G"], state["opt_D"], float(state.get("lr_scale", 1.0)))
            if self.opt_G is not None:
                self._load_optimizers()
        self._load_extra_state(state)

    def _load_optimizers(self) -> None:
        opt_G, opt_D, scale = self._pending_opt
        load_optimizer_state(self.opt_G, opt_G)
        load_optimizer_state(self.opt_D, opt_D)
        self._pending_opt = None
        # The optimisers' saved lrs already carry the scale; re-applying it from the base keeps them exact.
        self.lr_scale.set(scale)
