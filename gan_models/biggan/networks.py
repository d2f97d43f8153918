"""BigGAN's networks: a residual G with conditional BN fed by a shared class embedding and hierarchical z chunks, and
a residual projection D; spectral norm on every layer but the shared embedding, self-attention where configured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gan_models import layers
from gan_models.biggan.config import Config, d_arch, g_arch


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
