"""Discriminator augmentation for GANs trained on limited data, in plain PyTorch.

* ``AdaptiveAugment`` – ADA (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data"): every
  transform fires per image with probability p (times its multiplier); p follows the sign of D's real logits toward a
  target. Geometric transforms compose into one affine matrix applied with ``grid_sample`` and reflection padding,
  colour transforms into one 4×4 matrix in homogeneous RGB, as the paper's pipeline.
* ``diff_augment`` – DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
  colour, translation and cutout applied to every image.

Both are differentiable with respect to the images (G's gradient and R1 pass through them). Images are N×C×H×W,
nominally in [-1, 1]; colour transforms pivot around 0 (mid grey).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The paper's default pipeline ('bgc': blit + geometric + colour), each with probability multiplier 1.
BGC: dict[str, float] = dict(
    xflip=1,
    rotate90=1,
    xint=1,
    scale=1,
    rotate=1,
    aniso=1,
    xfrac=1,
    brightness=1,
    contrast=1,
    lumaflip=1,
    hue=1,
    saturation=1,
)
TRANSFORMS = tuple(BGC)


# ---------------------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices (one per image)


def _mat(rows: list[list], n: int, device) -> torch.Tensor:
    """Stack a matrix of python numbers and (n,) tensors into an (n, r, c) tensor."""
    flat = [e if torch.is_tensor(e) else torch.full([n], float(e), device=device) for row in rows for e in row]
    return torch.stack(flat, dim=-1).reshape(n, len(rows), len(rows[0]))


def _translate2d(tx, ty, n, device):
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, device)


def _scale2d(sx, sy, n, device):
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, device)


def _rotate2d(theta, n, device):
    c, s = torch.cos(theta), torch.sin(theta)
    return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, device)


def _translate3d(t, n, device):
    return _mat([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device)


def _scale3d(s, n, device):
    return _mat([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device)


def _rotate3d(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotation by ``theta`` about the unit axis ``v`` (Rodrigues), embedded in 4×4 homogeneous form."""
    n = theta.shape[0]
    x, y, z = v[0], v[1], v[2]
    k = torch.stack([torch.stack([0 * x, -z, y]), torch.stack([z, 0 * x, -x]), torch.stack([-y, x, 0 * x])])
    vv = torch.outer(v[:3], v[:3])
    c, s = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    r = c * torch.eye(3, device=v.device) + s * k + (1 - c) * vv
    out = torch.eye(4, device=v.device).repeat(n, 1, 1)
    out[:, :3, :3] = r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ADA


class AdaptiveAugment(nn.Module):
    """ADA's augmentation pipeline with its overall probability ``p`` (a buffer, so it checkpoints and can be
    all-reduced) and the controller that moves p.

    ``probs`` holds the per-transform probability multipliers (0 disables one); the defaults are the paper's.
    """

    def __init__(
        self,
        p: float = 0.0,
        target: float | None = 0.6,
        ada_kimg: float = 500.0,
        probs: dict[str, float] | None = None,
        xint_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_max: float = 1.0,
        aniso_std: float = 0.2,
        xfrac_std: float = 0.125,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1.0,
        saturation_std: float = 1.0,
    ):
        super().__init__()
        probs = dict(BGC if probs is None else probs)
        unknown = sorted(set(probs) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown ADA transform(s) {unknown}; valid: {', '.join(TRANSFORMS)}")
        if p < 0 or ada_kimg <= 0 or (target is not None and not 0 <= target <= 1):
            raise ValueError(f"ADA needs p >= 0 (got {p}), ada_kimg > 0 (got {ada_kimg}), target in [0, 1] ({target})")
        self.register_buffer("p", torch.tensor(float(p)))
        self.p_host = float(p)  # p mirrored on the host: reading the buffer in every forward would sync the GPU
        self.target, self.ada_kimg = target, ada_kimg
        self.probs = {name: float(probs.get(name, 0.0)) for name in TRANSFORMS}
        self.xint_max, self.scale_std, self.rotate_max = xint_max, scale_std, rotate_max
        self.aniso_std, self.xfrac_std = aniso_std, xfrac_std
        self.brightness_std, self.contrast_std = brightness_std, contrast_std
        self.hue_max, self.saturation_std = hue_max, saturation_std

    @torch.no_grad()
    def update(self, real_logits_sign_mean: float, batch_images: int) -> float:
        """Move p by ±batch_images/(ada_kimg·1000) toward making E[sign D(real)] equal the target; returns new p.

        ``batch_images`` is the number of images (over all workers) that produced ``real_logits_sign_mean``.
        """
        if self.target is None:
            return self.p_host
        direction = (
            math.copysign(1.0, real_logits_sign_mean - self.target) if real_logits_sign_mean != self.target else 0
        )
        self.p.copy_((self.p + direction * batch_images / (self.ada_kimg * 1000)).clamp(min=0))
        self.p_host = float(self.p)
        return self.p_host

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.p_host = float(self.p)

    def _chance(self, name: str, n: int, device, generator) -> torch.Tensor:
        """Per-image boolean: does transform ``name`` fire (probability multiplier × p)."""
        return torch.rand(n, device=device, generator=generator) < self.probs[name] * self.p_host

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.p_host <= 0:
            return images
        n, ch, h, w = images.shape
        draw = _Draws(n, images.device, generator)
        # Every random number is drawn in this order (geometric, then colour), so a seeded generator repeats a batch.
        g_inv = self._geometric(draw, h, w)
        if g_inv is not None:
            images = _warp(images, g_inv)
        c_mat = self._colour(draw, ch)
        if c_mat is not None:
            images = _recolour(images, c_mat)
        return images

    def _pick(self, draw: _Draws, name: str, value: torch.Tensor, identity: float) -> torch.Tensor:
        """Per image: ``value`` where transform ``name`` fires, else its identity value."""
        return torch.where(
            self._chance(name, draw.n, draw.device, draw.generator), value, torch.full_like(value, identity)
        )

    def _geometric(self, draw: _Draws, h: int, w: int) -> torch.Tensor | None:
        """G_inv (n×3×3), which maps output pixel coordinates (origin at the image centre) to input coordinates;
        None when no geometric transform is on."""
        n, dev, p = draw.n, draw.device, self.p_host
        g_inv = torch.eye(3, device=dev).repeat(n, 1, 1)
        geometric = False
        if self.probs["xflip"] > 0:
            i = self._pick(draw, "xflip", torch.floor(draw.rand(n) * 2), 0)
            g_inv = g_inv @ _scale2d(1 - 2 * i, 1, n, dev)
            geometric = True
        if self.probs["rotate90"] > 0:
            i = self._pick(draw, "rotate90", torch.floor(draw.rand(n) * 4), 0)
            g_inv = g_inv @ _rotate2d(math.pi / 2 * i, n, dev)
            geometric = True
        if self.probs["xint"] > 0:
            t = (draw.rand(n, 2) * 2 - 1) * self.xint_max
            t = torch.where(self._chance("xint", n, dev, draw.generator)[:, None], t, torch.zeros_like(t))
            g_inv = g_inv @ _translate2d(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h), n, dev)
            geometric = True
        if self.probs["scale"] > 0:
            s = self._pick(draw, "scale", torch.exp2(draw.randn(n) * self.scale_std), 1)
            g_inv = g_inv @ _scale2d(1 / s, 1 / s, n, dev)
            geometric = True
        # Rotation is split into a pre- and post-anisotropy part, each with p_rot, so P(either) = rotate·p.
        p_rot = 1 - math.sqrt(min(max(1 - self.probs["rotate"] * p, 0.0), 1.0))
        for stage in ("pre", "post"):
            if self.probs["rotate"] > 0:
                theta = (draw.rand(n) * 2 - 1) * math.pi * self.rotate_max
                theta = torch.where(draw.rand(n) < p_rot, theta, torch.zeros_like(theta))
                g_inv = g_inv @ _rotate2d(theta, n, dev)
                geometric = True
            if stage == "pre" and self.probs["aniso"] > 0:
                s = self._pick(draw, "aniso", torch.exp2(draw.randn(n) * self.aniso_std), 1)
                g_inv = g_inv @ _scale2d(1 / s, s, n, dev)
                geometric = True
        if self.probs["xfrac"] > 0:
            t = draw.randn(n, 2) * self.xfrac_std
            t = torch.where(self._chance("xfrac", n, dev, draw.generator)[:, None], t, torch.zeros_like(t))
            g_inv = g_inv @ _translate2d(-t[:, 0] * w, -t[:, 1] * h, n, dev)
            geometric = True
        return g_inv if geometric else None

    def _colour(self, draw: _Draws, ch: int) -> torch.Tensor | None:
        """C (n×4×4), which maps homogeneous RGB (r, g, b, 1) in to out; None when no colour transform is on."""
        n, dev = draw.n, draw.device
        c_mat = torch.eye(4, device=dev).repeat(n, 1, 1)
        colour = False
        v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev) / math.sqrt(3)  # the luma axis
        vv = torch.outer(v, v)
        if self.probs["brightness"] > 0:
            b = self._pick(draw, "brightness", draw.randn(n) * self.brightness_std, 0)
            c_mat = _translate3d(b, n, dev) @ c_mat
            colour = True
        if self.probs["contrast"] > 0:
            c = self._pick(draw, "contrast", torch.exp2(draw.randn(n) * self.contrast_std), 1)
            c_mat = _scale3d(c, n, dev) @ c_mat
            colour = True
        if self.probs["lumaflip"] > 0:
            i = self._pick(draw, "lumaflip", torch.floor(draw.rand(n) * 2), 0).view(n, 1, 1)
            c_mat = (torch.eye(4, device=dev) - 2 * vv * i) @ c_mat  # Householder reflection of luma
            colour = True
        if self.probs["hue"] > 0 and ch > 1:
            theta = self._pick(draw, "hue", (draw.rand(n) * 2 - 1) * math.pi * self.hue_max, 0)
            c_mat = _rotate3d(v, theta) @ c_mat
            colour = True
        if self.probs["saturation"] > 0 and ch > 1:
            s = self._pick(draw, "saturation", torch.exp2(draw.randn(n) * self.saturation_std), 1).view(n, 1, 1)
            c_mat = (vv + (torch.eye(4, device=dev) - vv) * s) @ c_mat
            colour = True
        return c_mat if colour else None

    def extra_repr(self) -> str:
        on = ", ".join(k for k, v in self.probs.items() if v > 0)
        return f"p={float(self.p):.4f}, target={self.target}, ada_kimg={self.ada_kimg}, transforms=[{on}]"


@dataclass(frozen=True)
class _Draws:
    """Uniform and normal draws for a batch of ``n`` images, from ``generator`` (None: torch's global RNG)."""

    n: int
    device: torch.device
    generator: torch.Generator | None

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, generator=self.generator)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.generator)


def _warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` through G_inv, bilinear with reflection padding."""
    n, ch, h, w = images.shape
    dev = images.device
    # Pixel coordinates → grid_sample's normalised coordinates (align_corners=False: x_norm = 2·x_pix / W).
    to_norm = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], device=dev))
    from_norm = torch.diag(torch.tensor([w / 2, h / 2, 1.0], device=dev))
    theta = (to_norm @ g_inv @ from_norm)[:, :2, :].to(images.dtype)
    grid = F.affine_grid(theta, [n, ch, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _recolour(images: torch.Tensor, c_mat: torch.Tensor) -> torch.Tensor:
    """Apply the colour matrix C to every pixel (RGB, or grey as the mean of C's RGB rows acting on (g, g, g))."""
    n, ch, h, w = images.shape
    c_mat = c_mat.to(images.dtype)
    flat = images.reshape(n, ch, h * w)
    if ch == 3:
        flat = c_mat[:, :3, :3] @ flat + c_mat[:, :3, 3:]
    elif ch == 1:
        m = c_mat[:, :3, :].mean(dim=1, keepdim=True)
        flat = flat * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    else:
        raise ValueError(f"ADA colour transforms need 1 or 3 channels, got {ch}")
    return flat.reshape(n, ch, h, w)


# ---------------------------------------------------------------------------------------------------------------------
# DiffAugment


def _brightness(x, gen):
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen, dtype=x.dtype) - 0.5)


def _saturation(x, gen):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen, dtype=x.dtype) * 2) + mean


def _contrast(x, gen):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=gen, dtype=x.dtype) + 0.5) + mean


def _translation(x, gen, ratio: float = 0.125):
    """Shift each image by an integer in [-ratio·size, ratio·size] per axis, filling with zeros."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, [n, 1, 1], device=x.device, generator=gen)
    tx = torch.randint(-sx, sx + 1, [n, 1, 1], device=x.device, generator=gen)
    # Output pixel (i, j) reads input (i - ty, j - tx) in a zero-padded copy, so content moves by +t.
    iy = (torch.arange(h, device=x.device).view(1, h, 1) - ty + sy).expand(n, h, w)
    ix = (torch.arange(w, device=x.device).view(1, 1, w) - tx + sx).expand(n, h, w)
    padded = F.pad(x, [sx, sx, sy, sy])
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, iy, ix].permute(0, 3, 1, 2).contiguous()


def _cutout(x, gen, ratio: float = 0.5):
    """Zero a (ratio·size)² square at a random centre (it may be clipped by the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), [n, 1, 1], device=x.device, generator=gen)
    cx = torch.randint(0, w + (1 - cw % 2), [n, 1, 1], device=x.device, generator=gen)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        ((ys - cy + ch // 2) >= 0)
        & ((ys - cy + ch // 2) < ch)
        & ((xs - cx + cw // 2) >= 0)
        & ((xs - cx + cw // 2) < cw)
    )
    return x * (~inside).unsqueeze(1).to(x.dtype)


DIFF_POLICIES = {"color": (_brightness, _saturation, _contrast), "translation": (_translation,), "cutout": (_cutout,)}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    bad = [p for p in names if p not in DIFF_POLICIES]
    if bad:
        raise ValueError(f"unknown DiffAugment policy {bad}; valid: {', '.join(DIFF_POLICIES)}")
    return names


def diff_augment(
    x: torch.Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None
) -> torch.Tensor:
    """DiffAugment: apply every transform of the comma-separated ``policy`` to every image, with random strength."""
    for name in parse_policy(policy):
        for fn in DIFF_POLICIES[name]:
            x = fn(x, generator)
    return x
