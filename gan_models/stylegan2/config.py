"""StyleGAN2's architecture and training hyper-parameters, with NVlabs' ``--cfg=stylegan2`` as defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gan_models import augment, losses

AUGMENTS = ("none", "ada", "diffaugment")
NOISE_MODES = ("random", "const", "none")


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
        return dataclasses.replace(
            self, g_lr=self.g_lr * root, d_lr=self.d_lr * root, r1_gamma=gamma, ema_kimg=self.ema_kimg * ratio
        )

    @property
    def resolved_gp_weight(self) -> float:
        return losses.default_gp_weight(self.loss) if self.gp_weight is None else self.gp_weight

    def resolved_r1_gamma(self, resolution: int, batch_size: int) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * resolution**2 / batch_size
