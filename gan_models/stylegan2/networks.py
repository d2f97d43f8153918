"""StyleGAN2's networks: a mapping network (lr multiplier 0.01, tracked w_avg, truncation), a skip generator of
modulated and demodulated convolutions with noise inputs, and a residual discriminator with minibatch stddev and
projection-style conditioning. Layer and parameter names follow NVlabs' ``training/networks.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gan_models.stylegan2.config import NOISE_MODES, Config
from gan_models.stylegan2.ops import (
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    bias_act,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
)


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
