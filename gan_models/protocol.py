"""The one interface between a training loop and a GAN, below both: models implement it, the orchestrator's loop,
evaluator and samplers use it, and neither side imports the other.

The loop knows a GAN only through this protocol: it never touches losses, phases or optimisers. Implementations live
beside their models (``gan_models.biggan.recipe``, ``gan_models.stylegan2.recipe``, both on
``gan_models.recipe_base.RecipeBase``) and are created with ``gan_models.make_recipe(name, model_cfg, hparams)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Wrap = Callable[[nn.Module], nn.Module]
"""Turns a module into its data-parallel training twin (``ray.train.torch.prepare_model`` / DDP, or identity)."""


@runtime_checkable
class Recipe(Protocol):
    G: nn.Module  # unwrapped generator; G(z, c) -> images in [-1, 1]
    D: nn.Module  # unwrapped discriminator; D(x, c) -> logits
    G_ema: nn.Module  # exponential moving average of G, used for samples, FID and export
    z_dim: int
    c_dim: int  # number of classes; 0 for an unconditional model

    def setup(
        self, device: torch.device, wrap: Wrap, *, amp: bool = False, accumulate: int = 1, compile: bool = False
    ) -> None:
        """Move to ``device``, wrap G and D for data-parallel training (``wrap``), build optimisers. ``amp``: bf16
        autocast (CUDA only); ``accumulate``: micro-batches per step; ``compile``: torch.compile the main passes."""

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Consume one real batch (N×3×H×W in [-1, 1], int64 labels): one D update, plus the G update and lazy
        regularisers when they are due. Returns scalar metrics named like ``loss/G``, ``loss/D``, as 0-d device
        tensors or Python floats (``gan_models.steps.read_metrics`` reads them; the loop does once per tick)."""

    def sample(self, z: torch.Tensor, c: torch.Tensor | None, truncation: float | None = None) -> torch.Tensor:
        """Images from G_ema in eval mode, no grad."""

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
        """n latent vectors drawn the way this model expects (truncated normal for BigGAN)."""

    def base_lrs(self) -> dict[str, float]:
        """The configured learning rates by optimiser ("G", "D"): what the health guard's lr scale multiplies."""

    def set_lr_scale(self, scale: float) -> None:
        """Every optimiser's lr = its base lr × ``scale`` (rollbacks of the health guard lower it)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue bit-for-bit: G, D, G_ema, optimisers, counters, ADA p."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s output, before or after ``setup`` (optimiser states wait for setup)."""
