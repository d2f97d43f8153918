"""BigGAN (Brock, Donahue & Simonyan, 2019): class-conditional residual G/D with spectral norm everywhere, a shared
class embedding and hierarchical z feeding conditional BN, self-attention, and a projection discriminator.

Architectures, defaults and hyper-parameters follow BigGAN-PyTorch (``BigGAN.py``, ``layers.py``, ``scripts/``);
parameter counts match it exactly (see tests/unit/test_biggan.py). Its ``BigGAN.py`` has no 512² discriminator, so
that one follows the paper's table (ch→ch→2ch→4ch→8ch→8ch→16ch→16ch, then a 16ch block without downsampling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gan_models import layers, losses
from gan_models.ema import frozen, make_ema, update_ema
from gan_models.losses import get_loss
from gan_models.protocol import Wrap
from gan_models.steps import LrScale, guarded_step, load_optimizer_state, micro_batches, sign_accuracy, sync_if

RESOLUTIONS = (32, 64, 128, 256, 512)
# Paper / BigGAN-PyTorch defaults per resolution: 128-512 from its TFHub converter and ImageNet launch script;
# 32 from its CIFAR script. 64 has no published config: we put attention at 32² (64² attention costs 4× as much).
_DEFAULTS = {
    32: dict(ch=64, dim_z=128, attn="0", n_classes=10),
    64: dict(ch=64, dim_z=128, attn="32", n_classes=1000),
    128: dict(ch=96, dim_z=120, attn="64", n_classes=1000),
    256: dict(ch=96, dim_z=140, attn="128", n_classes=1000),
    512: dict(ch=96, dim_z=128, attn="64", n_classes=1000),
}


def g_arch(ch: int, resolution: int) -> list[tuple[int, int]]:
    """(in, out) channels of G's up-blocks; block i outputs 8·2^i pixels square."""
    mult = {
        32: [4, 4, 4, 4],
        64: [16, 16, 8, 4, 2],
        128: [16, 16, 8, 4, 2, 1],
        256: [16, 16, 8, 8, 4, 2, 1],
        512: [16, 16, 8, 8, 4, 2, 1, 1],
    }[resolution]
    return [(ch * a, ch * b) for a, b in itertools.pairwise(mult)]


def d_arch(ch: int, resolution: int) -> list[tuple[int, int, bool, int]]:
    """(in, out, downsample, output resolution) of D's blocks."""
    mult = {
        32: [4, 4, 4, 4],
        64: [1, 2, 4, 8, 16],
        128: [1, 2, 4, 8, 16, 16],
        256: [1, 2, 4, 8, 8, 16, 16],
        512: [1, 1, 2, 4, 8, 8, 16, 16],
    }[resolution]
    # 32² (CIFAR) downsamples twice only, to 8², and BigGAN-PyTorch labels all four blocks 16 for attention lookup.
    n_down = 2 if resolution == 32 else len(mult) - 1
    blocks, cin, res = [], 3, resolution
    for i, m in enumerate(mult):
        down = i < n_down
        res = res // 2 if down else res
        blocks.append((cin, ch * m, down, 16 if resolution == 32 else res))
        cin = ch * m
    return blocks


@dataclass
class Config:
    """BigGAN architecture; field names follow BigGAN-PyTorch. Unset (None) fields take its defaults for
    ``resolution``: ``Config(resolution=128)`` is the ImageNet-128 model (ch 96, dim_z 120, attention at 64², 1000
    classes). ``ch`` is G_ch and D_ch unless ``g_ch``/``d_ch`` override it. ``attn`` lists '_'-separated
    resolutions with self-attention ('0': none). With ``hier``, z is split into one chunk per G block plus one for
    the first linear, and ``dim_z`` is rounded down to a multiple of that count, as BigGAN-PyTorch does.

    ``Config.preset("demo")``: the CPU demo model (32², ch 8, no attention, 10 classes, dim_z 64, shared_dim 32);
    ``Config.preset("cifar")``: BigGAN-PyTorch's CIFAR-10 script — see PRESETS.
    """

    resolution: int = 128
    ch: int | None = None
    g_ch: int | None = None
    d_ch: int | None = None
    dim_z: int | None = None
    shared_dim: int = 128
    n_classes: int | None = None
    attn: str | None = None
    hier: bool = True
    g_shared: bool = True
    init: str = "ortho"
    bn_eps: float = 1e-5
    sn_eps: float = 1e-6

    def __post_init__(self):
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution {self.resolution} not supported; valid: {', '.join(map(str, RESOLUTIONS))}")
        for k, v in _DEFAULTS[self.resolution].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        self.g_ch = self.g_ch or self.ch
        self.d_ch = self.d_ch or self.ch
        for k in ("ch", "g_ch", "d_ch", "dim_z", "shared_dim", "n_classes"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} {getattr(self, k)!r} not supported; valid: a positive integer")
        if self.init not in layers.INITS:
            raise ValueError(f"init {self.init!r} not supported; valid: {', '.join(layers.INITS)}")
        self.attn = str(self.attn)  # YAML may hand us 64 rather than '64'
        valid_attn = [8 * 2**i for i in range(len(g_arch(1, self.resolution)))]
        try:
            attn = [int(a) for a in self.attn.split("_")]
        except ValueError:
            attn = None
        if attn is None or any(a not in [0, *valid_attn] for a in attn):
            raise ValueError(
                f"attn {self.attn!r} not supported at {self.resolution}²; valid: '_'-separated from "
                f"{', '.join(map(str, [0, *valid_attn]))}"
            )
        if self.hier and not self.g_shared:
            raise ValueError("hier=True needs g_shared=True (z chunks are concatenated to the shared embedding)")
        if self.hier:
            slots = self.num_z_chunks
            if self.dim_z < slots:
                raise ValueError(f"dim_z {self.dim_z} too small; valid: ≥ {slots} (one per z chunk) with hier")
            self.dim_z -= self.dim_z % slots

    @property
    def c_dim(self) -> int:
        return self.n_classes

    @property
    def num_z_chunks(self) -> int:
        return len(g_arch(1, self.resolution)) + 1 if self.hier else 1

    @property
    def attn_resolutions(self) -> set[int]:
        return {int(a) for a in self.attn.split("_")} - {0}

    @classmethod
    def preset(cls, name: str, **overrides) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown BigGAN preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name][0], **overrides})


@dataclass
class HParams:
    """Training hyper-parameters; defaults are BigGAN-PyTorch's ImageNet launch script (launch_BigGAN_bs256x8.sh:
    G 1e-4, D 4e-4, one D step per G step at batch 2048, Adam(0, 0.999, eps 1e-6), EMA 0.9999 from G step 20k,
    no ortho reg). The paper used 2 D steps, lrs 5e-5/2e-4 and ortho reg 1e-4 (``g_ortho=1e-4``).
    Presets (``HParams.preset(name)``): 'imagenet', 'cifar' (launch_cifar_ema.sh), 'demo'.
    """

    g_lr: float = 1e-4
    d_lr: float = 4e-4
    betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-6
    n_d: int = 1  # D steps per G step
    loss: str = "hinge"  # hinge | logistic (non-saturating) | wgan (with a gradient penalty)
    gp_weight: float | None = None  # WGAN-GP λ on random interpolates; None = 10 for loss "wgan", else 0
    r1_gamma: float = 0.0  # R1 weight γ on real images (γ/2·E‖∇D(x)‖²), every D step; 0 = off
    ema_decay: float = 0.9999
    ema_start: int = 20000  # G steps before which G_ema just copies G
    g_ortho: float = 0.0  # off-diagonal ortho reg strength on G (not its shared embedding)
    d_ortho: float = 0.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        get_loss(self.loss)
        if not (isinstance(self.n_d, int) and self.n_d >= 1):
            raise ValueError(f"n_d {self.n_d!r} not supported; valid: an integer ≥ 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay {self.ema_decay} not supported; valid: 0 ≤ ema_decay < 1")
        for k in ("g_lr", "d_lr"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} {getattr(self, k)} not supported; valid: > 0")
        if self.gp_weight is not None and self.gp_weight < 0:
            raise ValueError(f"gp_weight {self.gp_weight} not supported; valid: ≥ 0, or null for the loss's default")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma {self.r1_gamma} not supported; valid: ≥ 0")

    def for_batch_ratio(self, ratio: float) -> HParams:
        """These hyper-parameters for a global batch ``ratio`` × the one they were set for (elastic runs): Adam lrs
        × √ratio, R1 γ ÷ ratio; the per-step EMA decay stays (its half-life in steps is unchanged)."""
        root = math.sqrt(ratio)
        return dataclasses.replace(self, g_lr=self.g_lr * root, d_lr=self.d_lr * root, r1_gamma=self.r1_gamma / ratio)

    @property
    def resolved_gp_weight(self) -> float:
        return losses.default_gp_weight(self.loss) if self.gp_weight is None else self.gp_weight

    @classmethod
    def preset(cls, name: str, **overrides) -> HParams:
        if name not in PRESETS:
            raise ValueError(f"unknown BigGAN preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name][1], **overrides})


# name -> (Config kwargs, HParams kwargs)
PRESETS: dict[str, tuple[dict, dict]] = {
    "imagenet": (dict(resolution=128), {}),
    # BigGAN-PyTorch's CIFAR-10 script: no shared embedding or hierarchical z, N(0, 0.02) init, batch 50.
    "cifar": (
        dict(resolution=32, g_shared=False, hier=False, init="N02"),
        dict(g_lr=2e-4, d_lr=2e-4, n_d=4, ema_start=1000, adam_eps=1e-8),
    ),
    # Fashion-MNIST padded to 32² on 1 CPU thread per worker: a narrow net (87k G / 67k D params, ~0.3 s per step
    # at batch 32) with high lrs and a short EMA. Garments of every class recognisable after ~450 steps, clean by
    # ~1500 (8 min on one thread, little variety within a class); ch 16 or lrs 2e-4/4e-4 still drew blobs then.
    "demo": (
        dict(resolution=32, ch=8, dim_z=64, shared_dim=32, attn="0", n_classes=10),
        dict(g_lr=1e-3, d_lr=1e-3, n_d=1, ema_decay=0.99, ema_start=100),
    ),
}


class GBlock(nn.Module):
    """BN-ReLU-up-conv-BN-ReLU-conv residual block; 1×1 conv on the (upsampled) shortcut."""

    def __init__(self, cin: int, cout: int, cond_dim: int, cfg: Config):
        super().__init__()
        conv = lambda a, b, k=3: layers.sn_conv2d(a, b, k, eps=cfg.sn_eps, init=cfg.init)  # noqa: E731
        bn = lambda c: layers.CCBN(c, cond_dim, cfg.g_shared, cfg.bn_eps, cfg.sn_eps, cfg.init)  # noqa: E731
        self.bn1, self.conv1, self.bn2, self.conv2 = bn(cin), conv(cin, cout), bn(cout), conv(cout, cout)
        self.conv_sc = conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """Wide residual block (hidden = out channels). The first block skips the pre-activation and downsamples its
    shortcut before the 1×1 conv; later ones convolve first (cheaper at the higher resolution)."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool, cfg: Config):
        super().__init__()
        conv = lambda a, b, k=3: layers.sn_conv2d(a, b, k, eps=cfg.sn_eps, init=cfg.init)  # noqa: E731
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.conv_sc = conv(cin, cout, 1) if cin != cout or downsample else None
        self.downsample, self.preactivation = downsample, preactivation

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x) if self.preactivation else x)
        h = self._down(self.conv2(F.relu(h)))
        if self.conv_sc is None:
            return h + x
        sc = self._down(self.conv_sc(x)) if self.preactivation else self.conv_sc(self._down(x))
        return h + sc


class Generator(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.c_dim = cfg.dim_z, cfg.n_classes
        self.chunk = cfg.dim_z // cfg.num_z_chunks
        arch = g_arch(cfg.g_ch, cfg.resolution)
        # Conditional BN sees [shared embedding ‖ z chunk] (hier), the shared embedding, or raw labels (not shared).
        cond_dim = (cfg.shared_dim + (self.chunk if cfg.hier else 0)) if cfg.g_shared else cfg.n_classes
        self.shared = layers.embedding(cfg.n_classes, cfg.shared_dim, cfg.init) if cfg.g_shared else None
        self.linear = layers.sn_linear(self.chunk, arch[0][0] * 16, eps=cfg.sn_eps, init=cfg.init)
        self.blocks = nn.ModuleList([GBlock(cin, cout, cond_dim, cfg) for cin, cout in arch])
        self.attn = nn.ModuleDict(
            {
                str(i): layers.Attention(cout, cfg.sn_eps, cfg.init)
                for i, (_, cout) in enumerate(arch)
                if 8 * 2**i in cfg.attn_resolutions
            }
        )
        self.out_bn = nn.BatchNorm2d(arch[-1][1], eps=cfg.bn_eps)
        self.out_conv = layers.sn_conv2d(arch[-1][1], 3, eps=cfg.sn_eps, init=cfg.init)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.shared(c) if self.shared is not None else c
        if self.cfg.hier:
            z0, *zs = z.split(self.chunk, dim=1)
            ys = [torch.cat([y, zi], dim=1) for zi in zs]
        else:
            z0, ys = z, [y] * len(self.blocks)
        h = self.linear(z0).view(z.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, ys[i])
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    """Residual D with global sum pooling and a projection head: D(x, y) = w·h + embed(y)·h."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.c_dim = cfg.n_classes
        arch = d_arch(cfg.d_ch, cfg.resolution)
        self.blocks = nn.ModuleList([DBlock(a, b, down, i > 0, cfg) for i, (a, b, down, _) in enumerate(arch)])
        self.attn = nn.ModuleDict(
            {
                str(i): layers.Attention(cout, cfg.sn_eps, cfg.init)
                for i, (_, cout, _, res) in enumerate(arch)
                if res in cfg.attn_resolutions
            }
        )
        cout = arch[-1][1]
        self.linear = layers.sn_linear(cout, 1, eps=cfg.sn_eps, init=cfg.init)
        self.embed = layers.sn_embedding(cfg.n_classes, cout, eps=cfg.sn_eps, init=cfg.init)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(c) * h).sum(dim=1)


def build(cfg: Config) -> tuple[Generator, Discriminator]:
    return Generator(cfg), Discriminator(cfg)


class Recipe:
    """BigGAN training: hinge loss (or logistic / WGAN-GP, plus optional R1), ``n_d`` D steps per G step,
    Adam(β1=0), G EMA with a start step, optional orthogonal regularisation, truncated-normal z at sampling.
    Call ``setup`` before ``load_state_dict``. Randomness (z, fake classes) comes from torch's global RNG, which the
    loop seeds per rank.

    Gradient accumulation (``setup(accumulate=k)``): the D update equals the full batch's (fakes are drawn in one
    no-grad pass, so G's BN sees the whole batch; spectral norm takes one power iteration per step). In the G update
    G's batch norm sees micro-batch statistics, as BigGAN-PyTorch's ``--num_G_accumulations`` does.
    """

    def __init__(self, cfg: Config, hparams: HParams):
        self.cfg, self.hp = cfg, hparams
        self.G, self.D = build(cfg)
        self.z_dim, self.c_dim = self.G.z_dim, cfg.n_classes
        self.d_loss, self.g_loss = get_loss(hparams.loss)
        self.d_steps = self.g_steps = 0
        self._parts: dict[int, list[torch.Tensor]] = {}
        self.last_g_loss = float("nan")  # no G step yet
        self.last_g_norm = float("nan")

    def setup(self, device: torch.device, wrap: Wrap, *, amp: bool = False, accumulate: int = 1,
              compile: bool = False) -> None:  # fmt: skip
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        # channels_last on CUDA and CPU alike (oneDNN's convolutions: G+D step 10-25% faster on CPU than NCHW).
        self.G.to(self.device, memory_format=torch.channels_last)
        self.D.to(self.device, memory_format=torch.channels_last)
        # bf16 has fp32's range, so no GradScaler is needed; AMP is CUDA-only (CPU autocast is slower here).
        self.amp = amp and cuda
        self.accumulate = int(accumulate)
        self._parts = {}
        self.G_train, self.D_eager = wrap(self.G), wrap(self.D)
        # Penalties double-backward through D, which compiled graphs cannot: they use the eager twin.
        self.D_train = torch.compile(self.D_eager) if compile else self.D_eager
        if compile:
            self.G_train = torch.compile(self.G_train)
        self.G_ema = make_ema(self.G)  # after wrap: DDP has broadcast rank 0's weights into G
        adam = lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=self.hp.betas, eps=self.hp.adam_eps)  # noqa: E731
        self.opt_G, self.opt_D = adam(self.G, self.hp.g_lr), adam(self.D, self.hp.d_lr)
        self.lr_scale = LrScale(self.opt_G, self.opt_D)
        self._g_ortho_params = layers.raw_weights(self.G, skip=self.G.shared.parameters() if self.G.shared else ())
        self._d_ortho_params = layers.raw_weights(self.D)

    def base_lrs(self) -> dict[str, float]:
        return {"G": self.hp.g_lr, "D": self.hp.d_lr}

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale.set(scale)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _fake_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.z_dim, device=self.device)
        y = torch.randint(self.cfg.n_classes, (n,), device=self.device)
        return z, y

    def _split(self, n: int) -> list[torch.Tensor]:
        """Micro-batch index tensors on the device, made once per batch size (a copy to the GPU syncs the host)."""
        if n not in self._parts:
            self._parts[n] = [i.to(self.device) for i in micro_batches(n, self.accumulate)]
        return self._parts[n]

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One D step (and a G step every ``n_d``). Metric values are 0-d device tensors (plus the Python
        ``health/nonfinite`` flag): the loop reads them once per tick, so a step syncs the host only to decide
        whether its optimiser steps are finite."""
        self.G.train()
        self.D.train()
        n = images.shape[0]
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)
        gp_weight, r1_gamma = self.hp.resolved_gp_weight, self.hp.r1_gamma

        # Fakes for the whole batch in one no-grad pass: G's BN statistics are the batch's whatever the split.
        z, y = self._fake_inputs(n)
        with torch.no_grad(), self._autocast():
            fake = self.G(z, y).to(images.dtype)
        self.opt_D.zero_grad(set_to_none=True)
        parts = self._split(n)
        alpha = torch.rand(n, 1, 1, 1, device=self.device) if gp_weight else None  # one draw for all micro-batches
        penalties = [k for k, on in (("loss/gp", gp_weight), ("loss/r1", r1_gamma)) if on]
        sums: dict[str, Any] = dict.fromkeys(["loss/D", "D/real", "D/fake", "health/D_sign_acc", *penalties], 0.0)
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
            sums["loss/D"] += loss_d.detach()
            sums["D/real"] += real_logits.detach().mean()
            sums["D/fake"] += fake_logits.detach().mean()
            sums["health/D_sign_acc"] += sign_accuracy(real_logits, fake_logits)
            # Penalties: extra forwards through the eager D, reusing this step's spectral norms.
            if gp_weight:
                with layers.power_iteration_off(self.D), sync_if(self.D_eager, last and not r1_gamma):
                    with self._autocast():
                        gp = losses.gradient_penalty(lambda x, c: self.D_eager(x, c).float(), images[idx],
                                                     fake[idx], labels[idx], alpha=alpha[idx])  # fmt: skip
                    (gp * gp_weight / len(parts)).backward()
                sums["loss/gp"] += gp.detach()
            if r1_gamma:
                with layers.power_iteration_off(self.D), sync_if(self.D_eager, last):
                    real = images[idx].detach().requires_grad_(True)
                    with self._autocast():
                        r1 = losses.r1_penalty(real, self.D_eager(real, labels[idx]).float())
                    (r1 * (r1_gamma / 2) / len(parts)).backward()
                sums["loss/r1"] += r1.detach()
        if self.hp.d_ortho > 0:
            layers.ortho_reg_(self._d_ortho_params, self.hp.d_ortho)
        d_norm, d_ok = guarded_step(self.opt_D, self.D.parameters())
        self.d_steps += 1

        metrics = {k: v / len(parts) for k, v in sums.items()}
        metrics["health/grad_norm_D"] = d_norm
        nonfinite = not d_ok
        if self.d_steps % self.hp.n_d == 0:
            g_ok = self._g_step(n)
            nonfinite = nonfinite or not g_ok
            # only on steps that ran G: the loop averages per reporting step
            metrics["loss/G"], metrics["health/grad_norm_G"] = self.last_g_loss, self.last_g_norm
        metrics["health/nonfinite"] = float(nonfinite)
        return metrics

    def _g_step(self, n: int) -> bool:
        z, y = self._fake_inputs(n)
        parts = self._split(n)
        self.opt_G.zero_grad(set_to_none=True)
        total: Any = 0.0
        for i, idx in enumerate(parts):
            first_only = contextlib.ExitStack()
            if i:  # one power iteration per step in G and D, as without accumulation
                first_only.enter_context(layers.power_iteration_off(self.G))
                first_only.enter_context(layers.power_iteration_off(self.D))
            # D is frozen for the G step: backward computes only the gradient through D into G, never D's own
            # weight gradients, and under DDP nothing of D is all-reduced.
            d_no_sync = getattr(self.D_train, "no_sync", contextlib.nullcontext)
            with first_only, d_no_sync(), frozen(self.D), sync_if(self.G_train, i == len(parts) - 1):
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "d_steps": self.d_steps,
            "g_steps": self.g_steps,
            "last_g_loss": float(self.last_g_loss),
            "lr_scale": self.lr_scale.scale,
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        load_optimizer_state(self.opt_G, state["opt_G"])
        load_optimizer_state(self.opt_D, state["opt_D"])
        self.d_steps, self.g_steps = state["d_steps"], state["g_steps"]
        self.last_g_loss = state["last_g_loss"]
        # The optimisers' saved lrs already carry the scale; re-applying it from the base keeps them exact.
        self.lr_scale.set(state.get("lr_scale", 1.0))
