"""StyleGAN2's training recipe: NVlabs' training cycle on one real batch, as a table of phases.

As in NVlabs' ``training/training_loop.py`` (its ``phases`` list) and ``training/loss.py`` (one block per phase):
Gmain and Dmain run every step, the lazy regularisers Greg (path length) and Dreg (R1) every ``pl_interval`` /
``r1_interval`` steps, weighted by their interval. Non-saturating logistic loss (or hinge / WGAN-GP), style mixing,
ADA or DiffAugment in front of D, G EMA by half-life.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gan_models import augment, ema, losses
from gan_models.recipe_base import DStats, RecipeBase
from gan_models.steps import guarded_step, sync_if
from gan_models.stylegan2.config import Config, HParams
from gan_models.stylegan2.networks import build


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class Batch:
    """A worker's real batch on the device and its micro-batches (index tensors)."""

    images: torch.Tensor
    c: torch.Tensor | None  # int64 labels; None for an unconditional model
    parts: list[torch.Tensor]
    size: int  # images over all workers: the batch R1's auto γ, the EMA and ADA count

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def k(self) -> int:
        return len(self.parts)

    def labels(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.c[idx] if self.c is not None else None

    def last(self, i: int) -> bool:
        return i == len(self.parts) - 1


@dataclass(frozen=True)
class Phase:
    """One phase of the cycle: it runs when ``step % interval == 0`` and steps one optimiser; ``run`` returns its
    metrics and whether that optimiser step was finite."""

    name: str
    interval: int
    run: Callable[[Batch], tuple[dict[str, Any], bool]]


class Recipe(RecipeBase):
    """NVlabs' training cycle on one real batch: Gmain, Greg (path length, lazy), Dmain, Dreg (R1, lazy).

    Both optimisers serve their main and regularisation phases; with lazy regularisation every k steps their lr and
    betas are rescaled by k/(k+1) (NVlabs' mb_ratio) so the pair behaves like one optimiser over k+1 minibatches.
    """

    def __init__(self, cfg: Config, hparams: HParams | None = None):
        hp = hparams or HParams()
        super().__init__(cfg, hp, *build(cfg), micro_batch_group=cfg.mbstd_group_size)
        self.ada = (
            augment.AdaptiveAugment(hp.augment_p, hp.ada_target, hp.ada_kimg, hp.ada_pipe)
            if hp.augment == "ada"
            else None
        )
        self.d_real_term, self.d_fake_term = losses.D_TERMS[hp.loss]
        self.g_loss = losses.get_loss(hp.loss)[1]
        self.pl_mean = torch.zeros([])
        self.cur_nimg = 0
        self.step = 0
        # ADA statistics since the last p update: sum of sign(D(real)) and number of logits.
        self.ada_sign_sum = 0.0
        self.ada_sign_count = 0
        self.phases = self._phases()

    def _phases(self) -> list[Phase]:
        """The phase table; a regulariser that is off has no phase (and its optimiser no mb_ratio: ``_optimizers``)."""
        hp = self.hp
        phases = [Phase("Gmain", 1, self._g_main)]
        if hp.pl_weight > 0:
            phases.append(Phase("Greg", hp.pl_interval, self._g_pl))
        phases.append(Phase("Dmain", 1, self._d_main))
        if hp.r1_gamma is None or hp.r1_gamma > 0:  # None: NVlabs' heuristic, always > 0
            phases.append(Phase("Dreg", hp.r1_interval, self._d_r1))
        return phases

    # -- setup -------------------------------------------------------------------------------------------------------

    def _memory_format(self) -> torch.memory_format:
        # channels_last on CUDA; on CPU only for narrow nets, the only ones oneDNN runs faster in it (see
        # docs/benchmarks.md, "Models").
        if self.device.type == "cuda" or self.cfg.channel_max <= 64:
            return torch.channels_last
        return torch.contiguous_format

    def _on_device(self) -> None:
        if self.ada is not None:
            self.ada.to(self.device)
        self.pl_mean = self.pl_mean.to(self.device)

    def _optimizers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        hp = self.hp
        pl_interval = hp.pl_interval if hp.pl_weight > 0 else None
        r1_interval = hp.r1_interval if hp.r1_gamma != 0 else None
        opt_G = self._adam(self.G.parameters(), hp.g_lr, pl_interval)
        opt_D = self._adam(self.D.parameters(), hp.d_lr, r1_interval)
        return opt_G, opt_D

    def _adam(self, params, lr: float, interval: int | None) -> torch.optim.Adam:
        """Adam for a main phase plus a lazy regulariser every ``interval`` steps (None = no regulariser)."""
        mb_ratio = interval / (interval + 1) if interval else 1.0
        betas = tuple(b**mb_ratio for b in self.hp.betas)
        return torch.optim.Adam(params, lr=lr * mb_ratio, betas=betas, eps=self.hp.eps)

    # -- one training cycle ------------------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One cycle on a worker's batch, in ``accumulate`` micro-batches. Micro-batches take whole
        minibatch-stddev groups and every phase's loss is divided by their count, so with ``noise_mode="const"``,
        no style mixing and no augmentation the update equals the full batch's (asserted in the tests); path
        length keeps NVlabs' per-round running mean. Metric values are 0-d device tensors (and Python floats for
        flags and ADA's p): the loop reads them once per tick; a step syncs only for its optimisers' finite checks."""
        self._require_setup()
        images = images.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        n = images.shape[0]
        c = labels.to(self.device) if self.c_dim > 0 else None
        batch = Batch(images, c, self._micro_batches(n), n * _world_size())
        metrics: dict[str, Any] = {}
        nonfinite = False
        for phase in self.phases:
            if self.step % phase.interval == 0:
                phase_metrics, ok = phase.run(batch)
                metrics.update(phase_metrics)
                nonfinite |= not ok
        metrics["aug/p"] = self._end_cycle(batch.size)
        metrics["health/nonfinite"] = float(nonfinite)
        return metrics

    def _g_main(self, b: Batch) -> tuple[dict[str, Any], bool]:
        """Gmain: make D call fakes real. D is frozen for this phase (as NVlabs): the backward computes only the
        gradient flowing through D into G, never D's own weight gradients, and nothing is all-reduced for D."""
        self.opt_G.zero_grad(set_to_none=True)
        z = torch.randn(b.n, self.z_dim, device=self.device)
        total = 0.0
        for i, idx in enumerate(b.parts):
            c = b.labels(idx)
            with sync_if(self.G_train, b.last(i)), self._d_no_sync(), ema.frozen(self.D):
                loss = self.g_loss(self._run_D(self._run_G(z[idx], c), c))
                (loss / b.k).backward()
            total += loss.detach()
        norm, ok = guarded_step(self.opt_G, self.G.parameters())
        return {"loss/G": total / b.k, "health/grad_norm_G": norm}, ok

    def _g_pl(self, b: Batch) -> tuple[dict[str, Any], bool]:
        """Greg: path-length regularisation on a batch shrunk by ``pl_batch_shrink``."""
        hp = self.hp
        self.opt_G.zero_grad(set_to_none=True)
        total = 0.0
        for i, idx in enumerate(b.parts):
            m = max(len(idx) // hp.pl_batch_shrink, 1)
            with sync_if(self.G_eager, b.last(i)):
                z = torch.randn(m, self.z_dim, device=self.device)
                img, ws = self._run_G(z, b.labels(idx[:m]), G=self.G_eager, return_ws=True)
                penalty = self._pl_penalty(path_lengths(img, ws))
                # The ×0 term keeps every G parameter in the graph (toRGB biases do not affect the path
                # length), which DDP needs to finish its gradient reduction.
                ((penalty * hp.pl_weight * hp.pl_interval + img[:, 0, 0, 0].float().mean() * 0) / b.k).backward()
            total += penalty.detach()
        _, ok = guarded_step(self.opt_G, self.G.parameters())
        return {"loss/pl": total / b.k}, ok

    def _pl_penalty(self, lengths: torch.Tensor) -> torch.Tensor:
        """E[(length − running mean)²], the running mean first moved toward this batch's mean length."""
        batch_mean = lengths.mean().detach()
        if _world_size() > 1:  # one shared running mean, so every rank penalises the same target
            dist.all_reduce(batch_mean)
            batch_mean /= _world_size()
        pl_mean = self.pl_mean.lerp(batch_mean, self.hp.pl_decay)
        self.pl_mean.copy_(pl_mean)
        return (lengths - pl_mean).square().mean()

    def _d_main(self, b: Batch) -> tuple[dict[str, Any], bool]:
        """Dmain: fakes scored low (G under no_grad, one pass for the whole batch), reals high. Separate fake and real
        passes as NVlabs: they keep minibatch-stddev groups pure. Only the cycle's last backward all-reduces."""
        gp_weight = self.hp.resolved_gp_weight
        self.opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = self._run_G(torch.randn(b.n, self.z_dim, device=self.device), b.c).to(b.images.dtype)
        stats = DStats(["loss/gp"] if gp_weight else [])
        alpha = torch.rand(b.n, 1, 1, 1, device=self.device) if gp_weight else None  # one draw for all micro-batches
        for i, idx in enumerate(b.parts):
            c, last = b.labels(idx), b.last(i)
            with self._d_no_sync():
                fake_logits = self._run_D(fake[idx], c)
                loss_fake = self.d_fake_term(fake_logits)
                (loss_fake / b.k).backward()
            with sync_if(self.D_train, last and not gp_weight):
                real_logits = self._run_D(b.images[idx], c)
                loss_real = self.d_real_term(real_logits)
                (loss_real / b.k).backward()
            if gp_weight:
                with sync_if(self.D_eager, last):
                    run_D = lambda x, cc: self._run_D(x, cc, D=self.D_eager)  # noqa: E731
                    gp = losses.gradient_penalty(run_D, b.images[idx], fake[idx], c, alpha=alpha[idx])
                    (gp * gp_weight / b.k).backward()
                stats.add_penalty("loss/gp", gp)
            real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
            stats.add(loss_fake.detach() + loss_real.detach(), real_logits, fake_logits)
            self.ada_sign_sum = self.ada_sign_sum + real_logits.sign().sum()  # read at the next p update
            self.ada_sign_count += len(idx)
        norm, ok = guarded_step(self.opt_D, self.D.parameters())
        return {**stats.means(b.k), "health/grad_norm_D": norm}, ok

    def _d_r1(self, b: Batch) -> tuple[dict[str, Any], bool]:
        """Dreg: R1 on reals, γ from the global batch (NVlabs' heuristic unless set)."""
        hp = self.hp
        gamma = hp.resolved_r1_gamma(self.cfg.resolution, b.size)
        self.opt_D.zero_grad(set_to_none=True)
        total = 0.0
        for i, idx in enumerate(b.parts):
            with sync_if(self.D_eager, b.last(i)):
                real = b.images[idx].detach().requires_grad_(True)
                real_logits = self._run_D(real, b.labels(idx), D=self.D_eager)
                r1 = losses.r1_penalty(real, real_logits)  # keeps all of D in the graph (DDP)
                (r1 * (gamma / 2) * hp.r1_interval / b.k).backward()
            total += r1.detach()
        _, ok = guarded_step(self.opt_D, self.D.parameters())
        return {"loss/r1": total / b.k}, ok

    def _end_cycle(self, batch: int) -> float:
        """EMA of G by half-life in images (decay from the images seen before this batch, as NVlabs), the counters,
        and ADA's p every ``ada_interval`` steps. Returns p."""
        hp = self.hp
        decay = ema.halflife_decay(batch, hp.ema_kimg, hp.ema_rampup, self.cur_nimg)
        ema.update_ema(self.G_ema, self.G, decay)
        self.cur_nimg += batch
        self.step += 1
        if self.ada is None:
            return 0.0
        if self.step % hp.ada_interval == 0:
            self._update_ada()
        return self.ada.p_host

    def _update_ada(self) -> None:
        sign_sum = torch.as_tensor(self.ada_sign_sum, dtype=torch.float64, device=self.device).reshape(1)
        count = torch.tensor([float(self.ada_sign_count)], dtype=torch.float64, device=self.device)
        stats = torch.cat([sign_sum, count])
        if _world_size() > 1:
            dist.all_reduce(stats)  # every worker then moves p identically
        total, count = stats.tolist()
        count = int(count)
        if count > 0:
            self.ada.update(total / count, count)
        self.ada_sign_sum, self.ada_sign_count = 0.0, 0

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.augment == "ada":
            return self.ada(images)
        if self.hp.augment == "diffaugment":
            return augment.diff_augment(images, self.hp.diffaugment_policy)
        return images

    def _run_G(self, z, c, G=None, **kwargs):
        G = self.G_train if G is None else G
        with self._autocast():
            return G(z, c, style_mixing_prob=self.hp.style_mixing_prob, noise_mode=self.hp.noise_mode, **kwargs)

    def _run_D(self, images, c, D=None):
        with self._autocast():
            return (self.D_train if D is None else D)(self._augment(images), c).float()

    # -- sampling ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, z: torch.Tensor, c: torch.Tensor | None, truncation: float | None = None) -> torch.Tensor:
        self.G_ema.eval()
        psi = 1.0 if truncation is None else float(truncation)
        z = z.to(self.device)
        c = c.to(self.device) if c is not None else None
        # Clamped like NVlabs' image export: G itself is unbounded so its gradients never saturate.
        return self.G_ema(z, c, truncation_psi=psi, noise_mode="const").float().clamp(-1, 1)

    def latents(self, n: int, generator: torch.Generator, truncation: float | None = None) -> torch.Tensor:
        """Standard normal z; StyleGAN truncates in W (``sample``'s ``truncation``), so ``truncation`` is unused."""
        return torch.randn(n, self.z_dim, generator=generator, device=generator.device).to(self.device)

    # -- checkpointing -----------------------------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {
            "cur_nimg": self.cur_nimg,
            "step": self.step,
            "pl_mean": self.pl_mean.detach().clone(),
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "ada_sign": (float(self.ada_sign_sum), self.ada_sign_count),
            "hparams": dataclasses.asdict(self.hp),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.cur_nimg, self.step = int(state["cur_nimg"]), int(state["step"])
        self.pl_mean = state["pl_mean"].to(self.device).clone()
        if self.ada is not None and state.get("ada") is not None:
            self.ada.load_state_dict(state["ada"])
        self.ada_sign_sum, self.ada_sign_count = state.get("ada_sign", (0.0, 0))


def path_lengths(img: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖J_wᵀ y‖ for a random image-space direction y ~ N(0, 1/(H·W)), averaged over the ws.

    The graph is kept (create_graph) so the penalty on these lengths can be back-propagated into G.
    """
    img = img.float()
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
    return grads.float().square().sum(dim=2).mean(dim=1).sqrt()
