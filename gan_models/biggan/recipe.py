"""BigGAN's training recipe: a D step on every batch, a G step every ``n_d`` D steps."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from gan_models import layers, losses
from gan_models.biggan.config import Config, HParams
from gan_models.biggan.networks import build
from gan_models.ema import frozen, update_ema
from gan_models.recipe_base import DStats, RecipeBase
from gan_models.steps import guarded_step, sync_if


class Recipe(RecipeBase):
    """BigGAN training: hinge loss (or logistic / WGAN-GP, plus optional R1), ``n_d`` D steps per G step,
    Adam(β1=0), G EMA with a start step, optional orthogonal regularisation, truncated-normal z at sampling.
    Randomness (z, fake classes) comes from torch's global RNG, which the loop seeds per rank.

    Gradient accumulation (``setup(accumulate=k)``): the D update equals the full batch's (fakes are drawn in one
    no-grad pass, so G's BN sees the whole batch; spectral norm takes one power iteration per step). In the G update
    G's batch norm sees micro-batch statistics, as BigGAN-PyTorch's ``--num_G_accumulations`` does.
    """

    def __init__(self, cfg: Config, hparams: HParams):
        super().__init__(cfg, hparams, *build(cfg))
        self.d_loss, self.g_loss = losses.get_loss(hparams.loss)
        self.d_steps = self.g_steps = 0
        self.last_g_loss = float("nan")  # no G step yet
        self.last_g_norm = float("nan")
        self._g_ortho_params: list[torch.nn.Parameter] = []
        self._d_ortho_params: list[torch.nn.Parameter] = []

    # -- setup -------------------------------------------------------------------------------------------------------

    def _memory_format(self) -> torch.memory_format:
        # channels_last on CUDA and CPU alike: oneDNN's convolutions run it faster than NCHW (docs/benchmarks.md).
        return torch.channels_last

    def _on_device(self) -> None:
        self._g_ortho_params = layers.raw_weights(self.G, skip=self.G.shared.parameters() if self.G.shared else ())
        self._d_ortho_params = layers.raw_weights(self.D)

    def _optimizers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        hp = self.hp
        opt_G = torch.optim.Adam(self.G.parameters(), lr=hp.g_lr, betas=hp.betas, eps=hp.adam_eps)
        opt_D = torch.optim.Adam(self.D.parameters(), lr=hp.d_lr, betas=hp.betas, eps=hp.adam_eps)
        return opt_G, opt_D

    # -- training ----------------------------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One D step (and a G step every ``n_d``). Metric values are 0-d device tensors (plus the Python
        ``health/nonfinite`` flag): the loop reads them once per tick, so a step syncs the host only to decide
        whether its optimiser steps are finite."""
        self._require_setup()
        self.G.train()
        self.D.train()
        n = images.shape[0]
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=self.memory_format)
        metrics, d_ok = self._d_step(images, labels)
        nonfinite = not d_ok
        if self.d_steps % self.hp.n_d == 0:
            g_ok = self._g_step(n)
            nonfinite = nonfinite or not g_ok
            # only on steps that ran G: the loop averages per reporting step
            metrics["loss/G"], metrics["health/grad_norm_G"] = self.last_g_loss, self.last_g_norm
        metrics["health/nonfinite"] = float(nonfinite)
        return metrics

    def _fake_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.z_dim, device=self.device)
        y = torch.randint(self.cfg.n_classes, (n,), device=self.device)
        return z, y

    def _d_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, Any], bool]:
        """One D update. Fakes for the whole batch come from one no-grad pass: G's BN statistics are the batch's
        whatever the split."""
        n = images.shape[0]
        gp_weight, r1_gamma = self.hp.resolved_gp_weight, self.hp.r1_gamma
        z, y = self._fake_inputs(n)
        with torch.no_grad(), self._autocast():
            fake = self.G(z, y).to(images.dtype)
        self.opt_D.zero_grad(set_to_none=True)
        parts = self._micro_batches(n)
        alpha = torch.rand(n, 1, 1, 1, device=self.device) if gp_weight else None  # one draw for all micro-batches
        stats = DStats([k for k, on in (("loss/gp", gp_weight), ("loss/r1", r1_gamma)) if on])
        for i, idx in enumerate(parts):
            last = i == len(parts) - 1
            # Real and fake in one forward, so DDP and the SN power iteration see one forward per backward; only
            # the step's first forward advances the power iteration.
            first_only = layers.power_iteration_off(self.D) if i else contextlib.nullcontext()
            with first_only, sync_if(self.D_train, last and not (gp_weight or r1_gamma)), self._autocast():
                logits = self.D_train(torch.cat([images[idx], fake[idx]]), torch.cat([labels[idx], y[idx]])).float()
                real_logits, fake_logits = logits.chunk(2)
                loss_d = self.d_loss(real_logits, fake_logits)
                (loss_d / len(parts)).backward()
            stats.add(loss_d.detach(), real_logits, fake_logits)
            part_alpha = alpha[idx] if alpha is not None else None
            for name, value in self._d_penalties(images[idx], fake[idx], labels[idx], part_alpha, last, len(parts)):
                stats.add_penalty(name, value)
        if self.hp.d_ortho > 0:
            layers.ortho_reg_(self._d_ortho_params, self.hp.d_ortho)
        d_norm, d_ok = guarded_step(self.opt_D, self.D.parameters())
        self.d_steps += 1
        return {**stats.means(len(parts)), "health/grad_norm_D": d_norm}, d_ok

    def _d_penalties(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        labels: torch.Tensor,
        alpha: torch.Tensor | None,
        last: bool,
        k: int,
    ) -> list[tuple[str, torch.Tensor]]:
        """The gradient penalty and R1 of one micro-batch, back-propagated: extra forwards through the eager D,
        reusing this step's spectral norms. Returns (metric name, unweighted penalty) for those that are on."""
        gp_weight, r1_gamma = self.hp.resolved_gp_weight, self.hp.r1_gamma
        out = []
        if gp_weight:
            with layers.power_iteration_off(self.D), sync_if(self.D_eager, last and not r1_gamma):
                with self._autocast():
                    run_D = lambda x, c: self.D_eager(x, c).float()  # noqa: E731
                    gp = losses.gradient_penalty(run_D, real, fake, labels, alpha=alpha)
                (gp * gp_weight / k).backward()
            out.append(("loss/gp", gp))
        if r1_gamma:
            with layers.power_iteration_off(self.D), sync_if(self.D_eager, last):
                real = real.detach().requires_grad_(True)
                with self._autocast():
                    r1 = losses.r1_penalty(real, self.D_eager(real, labels).float())
                (r1 * (r1_gamma / 2) / k).backward()
            out.append(("loss/r1", r1))
        return out

    def _g_step(self, n: int) -> bool:
        """One G update on fresh fakes, then G_ema (a copy of G until ``ema_start`` G steps). Returns whether the
        step was finite."""
        z, y = self._fake_inputs(n)
        parts = self._micro_batches(n)
        self.opt_G.zero_grad(set_to_none=True)
        total: Any = 0.0
        for i, idx in enumerate(parts):
            first_only = contextlib.ExitStack()
            if i:  # one power iteration per step in G and D, as without accumulation
                first_only.enter_context(layers.power_iteration_off(self.G))
                first_only.enter_context(layers.power_iteration_off(self.D))
            # D is frozen for the G step: backward computes only the gradient through D into G, never D's own
            # weight gradients, and under DDP nothing of D is all-reduced.
            with first_only, self._d_no_sync(), frozen(self.D), sync_if(self.G_train, i == len(parts) - 1):
                with self._autocast():
                    loss_g = self.g_loss(self.D_train(self.G_train(z[idx], y[idx]), y[idx]).float())
                (loss_g / len(parts)).backward()
            total += loss_g.detach()
        if self.hp.g_ortho > 0:
            layers.ortho_reg_(self._g_ortho_params, self.hp.g_ortho)
        self.last_g_norm, ok = guarded_step(self.opt_G, self.G.parameters())
        self.opt_D.zero_grad(set_to_none=True)  # frees the D step's gradients between steps
        self.g_steps += 1
        update_ema(self.G_ema, self.G, self.hp.ema_decay if self.g_steps >= self.hp.ema_start else 0.0)
        self.last_g_loss = total / len(parts)
        return ok

    # -- sampling ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, z: torch.Tensor, c: torch.Tensor | None, truncation: float | None = None) -> torch.Tensor:
        """Images from G_ema. BigGAN truncates z itself: draw z with ``latents(n, g, truncation)``; the
        ``truncation`` argument is accepted for the protocol and not applied again here."""
        self.G_ema.eval()
        if c is None:
            raise ValueError("BigGAN is class-conditional: pass int64 labels c of shape (N,)")
        with self._autocast():
            return self.G_ema(z.to(self.device), c.to(self.device)).float()

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
        """Standard normal z; with ``truncation`` t, entries with |z| > t are redrawn (truncated normal)."""
        z = torch.randn(n, self.z_dim, generator=generator, device=generator.device)
        if truncation is not None:
            if truncation <= 0:
                raise ValueError(f"truncation {truncation} not supported; valid: > 0")
            while (bad := z.abs() > truncation).any():
                z[bad] = torch.randn(int(bad.sum()), generator=generator, device=generator.device)
        return z

    # -- checkpointing -----------------------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"d_steps": self.d_steps, "g_steps": self.g_steps, "last_g_loss": float(self.last_g_loss)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.d_steps, self.g_steps = state["d_steps"], state["g_steps"]
        self.last_g_loss = state["last_g_loss"]
