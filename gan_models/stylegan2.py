"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN") with ADA/DiffAugment.

Networks: mapping network (lr multiplier 0.01, tracked w_avg, truncation), skip generator built from modulated and
demodulated convolutions with noise inputs, residual discriminator with minibatch stddev and projection-style
conditioning. Training: non-saturating logistic loss, lazy R1 and path-length regularisation, style mixing, G EMA by
half-life. Field names and defaults follow NVlabs' ``--cfg=stylegan2`` (stylegan3 repository, stylegan2-ada-pytorch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gan_models import augment, ema, losses
from gan_models.protocol import Wrap
from gan_models.steps import LrScale, guarded_step, load_optimizer_state, micro_batches, sign_accuracy, sync_if
from gan_models.stylegan2_ops import (
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    bias_act,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)

AUGMENTS = ("none", "ada", "diffaugment")
NOISE_MODES = ("random", "const", "none")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """Architecture. Unset fields are NVlabs' ``--cfg=stylegan2`` values (fp32 here: bf16 autocast replaces fp16)."""

    resolution: int = 256
    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0  # number of classes; labels are one-hot encoded inside, as NVlabs conditions on one-hot vectors
    img_channels: int = 3
    channel_base: int = 32768  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 512
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: float = 0.995  # decay of the tracked mean of W used for truncation
    embed_features: int | None = None  # size of the label embedding in the mapping; None = w_dim
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    cmap_dim: int | None = None  # D's projection size for labels; None = channels at 4×4
    d_mapping_layers: int = 8  # depth of D's label mapping (NVlabs' default MappingNetwork depth)
    conv_clamp: float | None = None  # ±clamp for conv outputs; NVlabs uses 256 only with fp16 (we use fp32/bf16)
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)
    fused_modconv: bool | None = None  # grouped-conv modulation; None = NVlabs' choice (only outside training)

    def __post_init__(self):
        r = self.resolution
        if not (isinstance(r, int) and r >= 8 and r & (r - 1) == 0):
            raise ValueError(f"resolution {r!r} is not a power of two >= 8; valid: 8, 16, 32, ..., 1024")
        for name in ("z_dim", "w_dim", "img_channels", "channel_base", "channel_max", "mapping_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 1")
        if self.c_dim < 0:
            raise ValueError(f"c_dim {self.c_dim!r} must be >= 0 (0 = unconditional)")
        if self.c_dim > 0 and self.d_mapping_layers < 1:
            raise ValueError(f"d_mapping_layers {self.d_mapping_layers!r} must be >= 1 for a conditional model")
        if self.mbstd_num_channels < 0 or (self.mbstd_group_size is not None and self.mbstd_group_size < 1):
            raise ValueError(
                f"mbstd_group_size {self.mbstd_group_size!r} / mbstd_num_channels {self.mbstd_num_channels!r}: "
                "valid are group >= 1 (or None = whole batch) and channels >= 0"
            )
        if min(self.channel_base // 4, self.channel_max) % max(self.mbstd_num_channels, 1):
            raise ValueError(f"mbstd_num_channels {self.mbstd_num_channels} must divide D's 4×4 channel count")
        if self.mapping_lr_multiplier <= 0:
            raise ValueError(f"mapping_lr_multiplier {self.mapping_lr_multiplier!r} must be > 0")
        self.resample_filter = tuple(self.resample_filter)

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)


@dataclass
class HParams:
    """Training hyper-parameters; defaults are NVlabs' ``--cfg=stylegan2`` (stylegan3 train.py, batch 32)."""

    g_lr: float = 0.002
    d_lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8
    loss: str = "logistic"  # logistic (non-saturating, NVlabs) | hinge | wgan (with a gradient penalty)
    gp_weight: float | None = None  # WGAN-GP λ on random interpolates, every step; None = 10 for "wgan", else 0
    noise_mode: str = "random"  # noise inputs in training passes; "const" makes a step a function of z alone
    r1_gamma: float | None = None  # None = NVlabs' auto heuristic 0.0002·resolution²/batch (global batch)
    r1_interval: int = 16  # lazy R1: every 16 steps, weighted ×16
    pl_weight: float = 2.0  # 0 disables path-length regularisation
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    style_mixing_prob: float = 0.9
    ema_kimg: float = 10.0  # G EMA half-life in thousands of images (NVlabs: batch·10/32)
    ema_rampup: float | None = 0.05  # half-life ≤ rampup·images seen; None = no ramp-up
    augment: str = "none"  # 'ada' | 'diffaugment' | 'none'
    augment_p: float = 0.0  # initial ADA probability
    ada_target: float | None = 0.6  # None = fixed p
    ada_kimg: float = 500.0  # images (in thousands) for p to move by 1
    ada_interval: int = 4
    ada_pipe: dict[str, float] = field(default_factory=lambda: dict(augment.BGC))  # transform → probability multiplier
    diffaugment_policy: str = "color,translation,cutout"

    def __post_init__(self):
        losses.get_loss(self.loss)
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode {self.noise_mode!r} is not valid; valid: {', '.join(NOISE_MODES)}")
        if self.gp_weight is not None and self.gp_weight < 0:
            raise ValueError(f"gp_weight {self.gp_weight} not supported; valid: ≥ 0, or null for the loss's default")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment {self.augment!r} is not valid; valid: {', '.join(AUGMENTS)}")
        for name in ("r1_interval", "pl_interval", "pl_batch_shrink", "ada_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= 1")
        if self.g_lr <= 0 or self.d_lr <= 0:
            raise ValueError(f"learning rates g_lr={self.g_lr!r}, d_lr={self.d_lr!r} must be > 0")
        if not 0 <= self.style_mixing_prob <= 1:
            raise ValueError(f"style_mixing_prob {self.style_mixing_prob!r} must be in [0, 1]")
        if self.augment == "diffaugment":
            augment.parse_policy(self.diffaugment_policy)
        self.betas = tuple(self.betas)

    def for_batch_ratio(self, ratio: float) -> HParams:
        """These hyper-parameters for a global batch ``ratio`` × the one they were set for (elastic runs): Adam lrs
        × √ratio, an explicit R1 γ ÷ ratio (the auto γ follows the batch already), EMA half-life × ratio."""
        root = math.sqrt(ratio)
        gamma = None if self.r1_gamma is None else self.r1_gamma / ratio
        return dataclasses.replace(self, g_lr=self.g_lr * root, d_lr=self.d_lr * root, r1_gamma=gamma,
                                   ema_kimg=self.ema_kimg * ratio)  # fmt: skip

    @property
    def resolved_gp_weight(self) -> float:
        return losses.default_gp_weight(self.loss) if self.gp_weight is None else self.gp_weight

    def resolved_r1_gamma(self, resolution: int, batch_size: int) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * resolution**2 / batch_size


def demo_fashion_mnist_32() -> tuple[Config, HParams]:
    """A class-conditional CPU demo for Fashion-MNIST padded to 32×32 (jobs/configs/stylegan2.yaml): ~40× fewer
    channels than NVlabs (88k G / 76k D parameters), 2 mapping layers in G and in D's label mapping, no path-length
    regularisation (a double backward through G for little gain on a short run), no style mixing, quick EMA.

    Tuned on 1 thread, batch 64 (the demo's 2 workers × 32), judged by G_ema grids at equal images seen
    (2026-11-23). With NVlabs' lr 0.0025 and R1 γ 1 (style mixing on or off) the grids were blobs at 12k images (D
    well ahead) and rough, noisy silhouettes at 32k. Equalised-lr weights are stored ~N(0, 1) and move by ~lr per
    Adam step, so a tiny net that must learn in minutes needs lrs well above 0.0025: 0.01/0.01 gave class silhouettes
    by ~36k but speckled (noise strengths grow fast), 0.005/0.005 smooth round blobs, γ 0.3 more speckle. G 0.01 /
    D 0.005 with γ 1 drew recognisable pullovers, coats, dresses, trousers, sneakers and sandals, one class per row,
    at 40k images (625 steps); little variety within a class by then.
    """
    cfg = Config(
        resolution=32,
        z_dim=64,
        w_dim=64,
        c_dim=10,
        channel_base=512,
        channel_max=32,
        mapping_layers=2,
        d_mapping_layers=2,
    )
    hp = HParams(
        g_lr=0.01,
        d_lr=0.005,
        pl_weight=0.0,
        r1_gamma=1.0,
        style_mixing_prob=0.0,
        ema_kimg=2.0,
        ema_rampup=0.05,
    )
    return cfg, hp


PRESETS = {"demo-fashion-mnist-32": demo_fashion_mnist_32}


def preset(name: str) -> tuple[Config, HParams]:
    """(Config, HParams) of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown stylegan2 preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------------------------------
# Networks


def labels_to_onehot(c: torch.Tensor | None, c_dim: int, n: int, device: torch.device) -> torch.Tensor | None:
    """int64 labels (N,) → one-hot float (N, c_dim); float (N, c_dim) passes through; None when unconditional."""
    if c_dim == 0:
        return None
    if c is None:
        raise ValueError(f"this model is conditional (c_dim={c_dim}); pass class labels c")
    if c.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        if c.shape != (n,):
            raise ValueError(f"integer labels must have shape ({n},), got {tuple(c.shape)}")
        # F.one_hot checks the values itself on the CPU, and on CUDA asserts on the device instead of reading
        # min/max back to the host (a sync in every G and D forward)
        try:
            return F.one_hot(c.to(device=device, dtype=torch.int64), c_dim).float()
        except RuntimeError as e:
            raise ValueError(f"label values outside 0..{c_dim - 1}: {e}") from None
    if c.shape != (n, c_dim):
        raise ValueError(f"float labels must have shape ({n}, {c_dim}), got {tuple(c.shape)}")
    return c.to(device=device, dtype=torch.float32)


class MappingNetwork(nn.Module):
    """z (and embedded one-hot c) → w through an MLP trained 100× slower, with a tracked w_avg for truncation."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int,
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.995,
        embed_features: int | None = None,
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed = (embed_features or w_dim) if c_dim > 0 else 0
        features = [z_dim + embed] + [w_dim] * num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed)
        for i in range(num_layers):
            layer = FullyConnectedLayer(features[i], features[i + 1], activation="lrelu", lr_multiplier=lr_multiplier)
            setattr(self, f"fc{i}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_w_avg: bool = True,
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.float()))
        if self.c_dim > 0:
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if self.w_avg_beta is not None and self.training and update_w_avg and self.num_ws is not None:
            self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is None:
            return x
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (optionally ×2 up) + per-pixel noise scaled by a learned strength + bias + lrelu."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: int, cfg: Config):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, cfg.conv_clamp
        self.register_buffer("resample_filter", setup_filter(cfg.resample_filter))
        self.affine = FullyConnectedLayer(w_dim, in_ch, bias_init=1)  # styles start at 1: identity modulation
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str, fused: bool, gain: float = 1.0):
        styles = self.affine(w)
        x = modulated_conv2d(
            x, self.weight, styles, up=self.up, padding=1, resample_filter=self.resample_filter, fused=fused
        )
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype) * (
                self.noise_strength.to(x.dtype)
            )
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        bias = self.bias
        if noise_mode == "none" and self.training:
            # ×0 on the (per-channel) bias keeps noise_strength in the backward graph: DDP expects a gradient for
            # every parameter and would otherwise never finish the step's reduction
            bias = bias + self.noise_strength * 0
        return bias_act(x, bias, act="lrelu", gain=gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1×1 conv without demodulation: the skip generator's per-resolution RGB contribution."""

    def __init__(self, in_ch: int, img_channels: int, w_dim: int, conv_clamp: float | None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_ch, bias_init=1)
        self.weight = nn.Parameter(torch.randn(img_channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(in_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const input or conv0 ×2 up), conv1, toRGB added to the upsampled image."""

    def __init__(self, in_ch: int, out_ch: int, resolution: int, cfg: Config):
        super().__init__()
        self.in_ch, self.resolution = in_ch, resolution
        self.register_buffer("resample_filter", setup_filter(cfg.resample_filter))
        if in_ch == 0:
            self.const = nn.Parameter(torch.randn(out_ch, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, cfg.w_dim, resolution, up=2, cfg=cfg)
        self.conv1 = SynthesisLayer(out_ch, out_ch, cfg.w_dim, resolution, up=1, cfg=cfg)
        self.torgb = ToRGBLayer(out_ch, cfg.img_channels, cfg.w_dim, cfg.conv_clamp)
        self.num_conv = 1 if in_ch == 0 else 2

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str, fused: bool, dtype: torch.dtype):
        if self.in_ch == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise_mode, fused)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, fused)
            x = self.conv1(x, ws[:, 1], noise_mode, fused)
        y = self.torgb(x, ws[:, self.num_conv], fused).float()
        img = upsample2d(img, self.resample_filter) + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w_dim = cfg.w_dim
        self.fused_modconv = cfg.fused_modconv
        self.block_resolutions = [2**i for i in range(2, int(math.log2(cfg.resolution)) + 1)]
        self.num_ws = 0
        for res in self.block_resolutions:
            in_ch = cfg.channels(res // 2) if res > 4 else 0
            block = SynthesisBlock(in_ch, cfg.channels(res), res, cfg)
            setattr(self, f"b{res}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last toRGB; every other toRGB shares its w with the next block's first conv

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", fused_modconv: bool | None = None) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode {noise_mode!r} is not valid; valid: {', '.join(NOISE_MODES)}")
        if fused_modconv is None:
            fused_modconv = self.fused_modconv if self.fused_modconv is not None else not self.training
        on = ws.device.type  # the synthesis layers run in the autocast dtype of the device they are on
        dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else torch.float32
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], noise_mode, fused_modconv, dtype)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """G(z, c) → images N×C×H×W, roughly in [-1, 1] (not clamped, as NVlabs; clamp for display)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.c_dim, self.w_dim = cfg.z_dim, cfg.c_dim, cfg.w_dim
        self.img_resolution, self.img_channels = cfg.resolution, cfg.img_channels
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            cfg.z_dim,
            cfg.c_dim,
            cfg.w_dim,
            self.num_ws,
            cfg.mapping_layers,
            cfg.mapping_lr_multiplier,
            cfg.w_avg_beta,
            cfg.embed_features,
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
        fused_modconv: bool | None = None,
        style_mixing_prob: float = 0.0,
        return_ws: bool = False,
    ):
        """Style mixing and returning ws happen here (not in the caller) so a DDP-wrapped G runs one forward per
        backward. With probability ``style_mixing_prob`` the ws from a random cutoff on come from a second z."""
        c = labels_to_onehot(c, self.c_dim, z.shape[0], z.device)
        # The mapping stays fp32 under bf16 autocast, as NVlabs': ws (the path-length penalty differentiates by them)
        # and their running mean keep full precision.
        with torch.autocast(z.device.type, enabled=False):
            ws = self._map(z, c, truncation_psi, truncation_cutoff, style_mixing_prob)
        img = self.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        return (img, ws) if return_ws else img

    def _map(self, z, c, truncation_psi, truncation_cutoff, style_mixing_prob):
        z, c = z.float(), c.float() if c is not None else None
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        if style_mixing_prob > 0:
            # As NVlabs: the second mapping always runs and the cutoff stays a tensor, so torch.compile traces one
            # graph instead of one per cutoff value (and no host sync per step).
            dev = z.device
            cutoff = torch.randint(1, max(self.num_ws, 2), [], device=dev)
            keep = torch.rand([], device=dev) >= style_mixing_prob
            cutoff = torch.where(keep, torch.full_like(cutoff, self.num_ws), cutoff)
            ws2 = self.mapping(torch.randn_like(z), c, truncation_psi, truncation_cutoff, update_w_avg=False)
            ws = torch.where(torch.arange(self.num_ws, device=dev)[None, :, None] >= cutoff, ws2, ws)
        return ws


class DiscriminatorBlock(nn.Module):
    """Residual D block: two 3×3 convs (second one ×2 down) plus a 1×1 ×2-down skip, summed with √½ gains."""

    def __init__(self, in_ch: int, tmp_ch: int, out_ch: int, cfg: Config):
        super().__init__()
        self.in_ch = in_ch
        f, clamp = cfg.resample_filter, cfg.conv_clamp
        if in_ch == 0:
            self.fromrgb = Conv2dLayer(cfg.img_channels, tmp_ch, 1, activation="lrelu", conv_clamp=clamp)
        self.conv0 = Conv2dLayer(tmp_ch, tmp_ch, 3, activation="lrelu", conv_clamp=clamp)
        self.conv1 = Conv2dLayer(tmp_ch, out_ch, 3, activation="lrelu", down=2, resample_filter=f, conv_clamp=clamp)
        self.skip = Conv2dLayer(tmp_ch, out_ch, 1, bias=False, down=2, resample_filter=f)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_ch == 0:
            x = self.fromrgb(img)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nn.Module):
    def __init__(self, in_ch: int, cmap_dim: int, cfg: Config):
        super().__init__()
        self.cmap_dim = cmap_dim
        m = cfg.mbstd_num_channels
        self.mbstd = MinibatchStdLayer(cfg.mbstd_group_size, m) if m > 0 else None
        self.conv = Conv2dLayer(in_ch + m, in_ch, 3, activation="lrelu", conv_clamp=cfg.conv_clamp)
        self.fc = FullyConnectedLayer(in_ch * 16, in_ch, activation="lrelu")
        self.out = FullyConnectedLayer(in_ch, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.float()
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if cmap is not None:  # projection conditioning: score = <features, embedding of c> / √dim
            x = (x * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)
        return x


class Discriminator(nn.Module):
    """D(x, c) → logits (N,)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.c_dim, self.img_resolution, self.img_channels = cfg.c_dim, cfg.resolution, cfg.img_channels
        self.block_resolutions = [2**i for i in range(int(math.log2(cfg.resolution)), 2, -1)]
        for res in self.block_resolutions:
            in_ch = cfg.channels(res) if res < cfg.resolution else 0
            setattr(self, f"b{res}", DiscriminatorBlock(in_ch, cfg.channels(res), cfg.channels(res // 2), cfg))
        cmap_dim = 0 if cfg.c_dim == 0 else (cfg.cmap_dim or cfg.channels(4))
        if cfg.c_dim > 0:
            # NVlabs' D maps c with a default (8-layer, lr×0.01) mapping network, independent of G's depth.
            self.mapping = MappingNetwork(
                0, cfg.c_dim, cmap_dim, None, cfg.d_mapping_layers, cfg.mapping_lr_multiplier, None, cfg.embed_features
            )
        self.b4 = DiscriminatorEpilogue(cfg.channels(4), cmap_dim, cfg)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"D expects images N×{expected[0]}×{expected[1]}×{expected[2]}, got {tuple(img.shape)}")
        c = labels_to_onehot(c, self.c_dim, img.shape[0], img.device)
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        return self.b4(x, cmap).squeeze(1)


def build(cfg: Config) -> tuple[Generator, Discriminator]:
    return Generator(cfg), Discriminator(cfg)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Training recipe


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Recipe:
    """NVlabs' training cycle on one real batch: Gmain, Greg (path length, lazy), Dmain, Dreg (R1, lazy).

    Both optimisers serve their main and regularisation phases; with lazy regularisation every k steps their lr and
    betas are rescaled by k/(k+1) (NVlabs' mb_ratio) so the pair behaves like one optimiser over k+1 minibatches.
    """

    def __init__(self, cfg: Config, hparams: HParams | None = None):
        self.cfg, self.hp = cfg, hparams or HParams()
        self.G, self.D = build(cfg)
        self.G_ema = ema.make_ema(self.G)
        self.z_dim, self.c_dim = cfg.z_dim, cfg.c_dim
        self.G_train: nn.Module = self.G
        self.D_train: nn.Module = self.D
        self.G_eager, self.D_eager = self.G, self.D
        self.device = torch.device("cpu")
        self.amp = False
        self.memory_format = torch.contiguous_format
        self.opt_G: torch.optim.Optimizer | None = None
        self.opt_D: torch.optim.Optimizer | None = None
        self._pending_opt: tuple[dict, dict] | None = None
        self._pending_lr_scale = 1.0
        self.ada = (
            augment.AdaptiveAugment(self.hp.augment_p, self.hp.ada_target, self.hp.ada_kimg, self.hp.ada_pipe)
            if self.hp.augment == "ada"
            else None
        )
        self.pl_mean = torch.zeros([])
        self.cur_nimg = 0
        self.step = 0
        # ADA statistics since the last p update: sum of sign(D(real)) and number of logits.
        self.ada_sign_sum = 0.0
        self.ada_sign_count = 0

    # -- setup ---------------------------------------------------------------------------------------------------------

    def _adam(self, params, lr: float, interval: int | None) -> torch.optim.Adam:
        """Adam for a main phase plus a lazy regulariser every ``interval`` steps (None = no regulariser)."""
        mb_ratio = interval / (interval + 1) if interval else 1.0
        betas = tuple(b**mb_ratio for b in self.hp.betas)
        return torch.optim.Adam(params, lr=lr * mb_ratio, betas=betas, eps=self.hp.eps)

    def setup(self, device: torch.device, wrap: Wrap, *, amp: bool = False, accumulate: int = 1,
              compile: bool = False) -> None:  # fmt: skip
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp = amp and cuda  # bf16 autocast needs no loss scaling; on CPU we stay in fp32
        self.accumulate = int(accumulate)
        self._parts: dict[int, list[torch.Tensor]] = {}
        # channels_last on CUDA; on CPU only for narrow nets: oneDNN ran the demo nets' (≤ 32 channels) G and D passes
        # ~20% faster than NCHW, but at NVlabs' widths the main passes were 2-6% and the R1 / path-length double
        # backward 15-20% slower (1 thread, 2026-11-23).
        fmt = torch.channels_last if cuda or self.cfg.channel_max <= 64 else torch.contiguous_format
        self.memory_format = fmt
        for m in (self.G, self.D, self.G_ema):
            m.to(self.device, memory_format=fmt)
        if self.ada is not None:
            self.ada.to(self.device)
        self.pl_mean = self.pl_mean.to(self.device)
        # R1, path length and the gradient penalty double-backward, which compiled graphs cannot: they run on the
        # eager (DDP-wrapped) twins; the main phases may be compiled.
        self.G_eager, self.D_eager = wrap(self.G), wrap(self.D)
        self.G_train = torch.compile(self.G_eager) if compile else self.G_eager
        self.D_train = torch.compile(self.D_eager) if compile else self.D_eager
        pl_interval = self.hp.pl_interval if self.hp.pl_weight > 0 else None
        r1_interval = self.hp.r1_interval if self.hp.r1_gamma != 0 else None
        self.opt_G = self._adam(self.G.parameters(), self.hp.g_lr, pl_interval)
        self.opt_D = self._adam(self.D.parameters(), self.hp.d_lr, r1_interval)
        self.lr_scale = LrScale(self.opt_G, self.opt_D)
        if self._pending_opt is not None:  # a checkpoint loaded before setup
            self._load_optimisers()

    def _load_optimisers(self) -> None:
        load_optimizer_state(self.opt_G, self._pending_opt[0])
        load_optimizer_state(self.opt_D, self._pending_opt[1])
        self._pending_opt = None
        self.lr_scale.set(self._pending_lr_scale)

    def base_lrs(self) -> dict[str, float]:
        return {"G": self.hp.g_lr, "D": self.hp.d_lr}

    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale.set(scale)

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.hp.augment == "ada":
            return self.ada(images)
        if self.hp.augment == "diffaugment":
            return augment.diff_augment(images, self.hp.diffaugment_policy)
        return images

    def _run_G(self, z, c, G=None, **kwargs):
        with self._autocast():
            return (self.G_train if G is None else G)(z, c, style_mixing_prob=self.hp.style_mixing_prob,
                                       noise_mode=self.hp.noise_mode, **kwargs)  # fmt: skip

    def _run_D(self, images, c, D=None):
        with self._autocast():
            return (self.D_train if D is None else D)(self._augment(images), c).float()

    # -- one training cycle --------------------------------------------------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One cycle on a worker's batch, in ``accumulate`` micro-batches. Micro-batches take whole
        minibatch-stddev groups and every phase's loss is divided by their count, so with ``noise_mode="const"``,
        no style mixing and no augmentation the update equals the full batch's (asserted in the tests); path
        length keeps NVlabs' per-round running mean. Metric values are 0-d device tensors (and Python floats for
        flags and ADA's p): the loop reads them once per tick; a step syncs only for its optimisers' finite checks."""
        if self.opt_G is None:
            raise RuntimeError("call setup(device, wrap) before train_step")
        hp = self.hp
        images = images.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        n = images.shape[0]
        c = labels.to(self.device) if self.c_dim > 0 else None
        batch = n * _world_size()
        if n not in self._parts:  # index tensors made once per batch size: a copy to the GPU syncs the host
            self._parts[n] = [i.to(self.device) for i in micro_batches(n, self.accumulate, self.cfg.mbstd_group_size)]
        parts = self._parts[n]
        k = len(parts)
        sub = lambda t, idx: t[idx] if t is not None else None  # noqa: E731
        d_real_term, d_fake_term = losses.D_TERMS[hp.loss]
        g_loss = losses.get_loss(hp.loss)[1]
        d_no_sync = getattr(self.D_train, "no_sync", contextlib.nullcontext)
        metrics: dict[str, Any] = {}
        nonfinite = False

        # Gmain: make D call fakes real. D is frozen for this phase (as NVlabs): the backward computes only the
        # gradient flowing through D into G, never D's own weight gradients, and nothing is all-reduced for D.
        self.opt_G.zero_grad(set_to_none=True)
        z = torch.randn(n, self.z_dim, device=self.device)
        total = 0.0
        for i, idx in enumerate(parts):
            with sync_if(self.G_train, i == k - 1), d_no_sync(), ema.frozen(self.D):
                loss_G = g_loss(self._run_D(self._run_G(z[idx], sub(c, idx)), sub(c, idx)))
                (loss_G / k).backward()
            total += loss_G.detach()
        g_norm, ok = guarded_step(self.opt_G, self.G.parameters())
        nonfinite |= not ok
        metrics["loss/G"], metrics["health/grad_norm_G"] = total / k, g_norm

        # Greg: path-length regularisation on a shrunken batch, every pl_interval steps, weighted by the interval.
        if hp.pl_weight > 0 and self.step % hp.pl_interval == 0:
            self.opt_G.zero_grad(set_to_none=True)
            total = 0.0
            for i, idx in enumerate(parts):
                m = max(len(idx) // hp.pl_batch_shrink, 1)
                with sync_if(self.G_eager, i == k - 1):
                    img, ws = self._run_G(torch.randn(m, self.z_dim, device=self.device), sub(c, idx[:m]),
                                          G=self.G_eager, return_ws=True)  # fmt: skip
                    pl_lengths = path_lengths(img, ws)
                    batch_mean = pl_lengths.mean().detach()
                    if _world_size() > 1:  # one shared running mean, so every rank penalises the same target
                        dist.all_reduce(batch_mean)
                        batch_mean /= _world_size()
                    pl_mean = self.pl_mean.lerp(batch_mean, hp.pl_decay)
                    self.pl_mean.copy_(pl_mean)
                    pl_penalty = (pl_lengths - pl_mean).square().mean()
                    # The ×0 term keeps every G parameter in the graph (toRGB biases do not affect the path
                    # length), which DDP needs to finish its gradient reduction.
                    ((pl_penalty * hp.pl_weight * hp.pl_interval + img[:, 0, 0, 0].float().mean() * 0) / k).backward()
                total += pl_penalty.detach()
            _, ok = guarded_step(self.opt_G, self.G.parameters())
            nonfinite |= not ok
            metrics["loss/pl"] = total / k

        # Dmain: fakes scored low (G under no_grad, one pass for the whole batch), reals high. Separate fake and real
        # passes as NVlabs: they keep minibatch-stddev groups pure. Only the cycle's last backward all-reduces.
        gp_weight = hp.resolved_gp_weight
        self.opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = self._run_G(torch.randn(n, self.z_dim, device=self.device), c).to(images.dtype)
        penalties = ["loss/gp"] if gp_weight else []
        sums: dict[str, Any] = dict.fromkeys(["loss/D", "D/real", "D/fake", "health/D_sign_acc", *penalties], 0.0)
        alpha = torch.rand(n, 1, 1, 1, device=self.device) if gp_weight else None  # one draw for all micro-batches
        for i, idx in enumerate(parts):
            last = i == k - 1
            with d_no_sync():
                fake_logits = self._run_D(fake[idx], sub(c, idx))
                loss_fake = d_fake_term(fake_logits)
                (loss_fake / k).backward()
            with sync_if(self.D_train, last and not gp_weight):
                real_logits = self._run_D(images[idx], sub(c, idx))
                loss_real = d_real_term(real_logits)
                (loss_real / k).backward()
            if gp_weight:
                with sync_if(self.D_eager, last):
                    gp = losses.gradient_penalty(lambda x, cc: self._run_D(x, cc, D=self.D_eager), images[idx],
                                                 fake[idx], sub(c, idx), alpha=alpha[idx])  # fmt: skip
                    (gp * gp_weight / k).backward()
                sums["loss/gp"] += gp.detach()
            real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
            sums["loss/D"] += loss_fake.detach() + loss_real.detach()
            sums["D/real"] += real_logits.mean()
            sums["D/fake"] += fake_logits.mean()
            sums["health/D_sign_acc"] += sign_accuracy(real_logits, fake_logits)
            self.ada_sign_sum = self.ada_sign_sum + real_logits.sign().sum()  # read at the next p update
            self.ada_sign_count += len(idx)
        d_norm, ok = guarded_step(self.opt_D, self.D.parameters())
        nonfinite |= not ok
        metrics.update({key: v / k for key, v in sums.items()})
        metrics["health/grad_norm_D"] = d_norm

        # Dreg: R1 on reals every r1_interval steps, weighted by the interval.
        if self.step % hp.r1_interval == 0:
            gamma = hp.resolved_r1_gamma(self.cfg.resolution, batch)
            if gamma > 0:
                self.opt_D.zero_grad(set_to_none=True)
                total = 0.0
                for i, idx in enumerate(parts):
                    with sync_if(self.D_eager, i == k - 1):
                        real = images[idx].detach().requires_grad_(True)
                        real_logits = self._run_D(real, sub(c, idx), D=self.D_eager)
                        r1 = losses.r1_penalty(real, real_logits)  # keeps all of D in the graph (DDP)
                        (r1 * (gamma / 2) * hp.r1_interval / k).backward()
                    total += r1.detach()
                _, ok = guarded_step(self.opt_D, self.D.parameters())
                nonfinite |= not ok
                metrics["loss/r1"] = total / k

        # EMA of G by half-life in images (decay from the images seen before this batch, as NVlabs).
        decay = ema.halflife_decay(batch, hp.ema_kimg, hp.ema_rampup, self.cur_nimg)
        ema.update_ema(self.G_ema, self.G, decay)
        self.cur_nimg += batch
        self.step += 1

        if self.ada is not None:
            if self.step % hp.ada_interval == 0:
                self._update_ada()
            metrics["aug/p"] = self.ada.p_host
        else:
            metrics["aug/p"] = 0.0
        metrics["health/nonfinite"] = float(nonfinite)
        return metrics

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

    # -- sampling ------------------------------------------------------------------------------------------------------

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

    # -- checkpointing -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict() if self.opt_G is not None else None,
            "opt_D": self.opt_D.state_dict() if self.opt_D is not None else None,
            "cur_nimg": self.cur_nimg,
            "step": self.step,
            "pl_mean": self.pl_mean.detach().clone(),
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "ada_sign": (float(self.ada_sign_sum), self.ada_sign_count),
            "lr_scale": self.lr_scale.scale if self.opt_G is not None else 1.0,
            "config": dataclasses.asdict(self.cfg),
            "hparams": dataclasses.asdict(self.hp),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        if state.get("opt_G") is not None:
            self._pending_opt = (state["opt_G"], state["opt_D"])
            self._pending_lr_scale = float(state.get("lr_scale", 1.0))
            if self.opt_G is not None:
                self._load_optimisers()
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
