"""BigGAN's architecture and training hyper-parameters, with BigGAN-PyTorch's names and defaults."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from gan_models import layers, losses

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
    BigGAN-PyTorch's CIFAR-10 script is ``Config(resolution=32, g_shared=False, hier=False, init="N02")``; the job
    YAML (jobs/configs/biggan.yaml) holds the CPU demo model.
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


@dataclass
class HParams:
    """Training hyper-parameters; defaults are BigGAN-PyTorch's ImageNet launch script (launch_BigGAN_bs256x8.sh:
    G 1e-4, D 4e-4, one D step per G step at batch 2048, Adam(0, 0.999, eps 1e-6), EMA 0.9999 from G step 20k,
    no ortho reg). The paper used 2 D steps, lrs 5e-5/2e-4 and ortho reg 1e-4 (``g_ortho=1e-4``).
    BigGAN-PyTorch's CIFAR-10 script (launch_cifar_ema.sh, batch 50): lrs 2e-4/2e-4, n_d 4, ema_start 1000,
    adam_eps 1e-8.
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
        losses.get_loss(self.loss)
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
