"""GAN objectives. Each takes discriminator logits and returns a scalar to minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BigGAN's discriminator hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def logistic_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's non-saturating logistic loss for D: softplus(D(G(z))) + softplus(-D(x))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def logistic_ns_g(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def wgan_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return fake_logits.mean() - real_logits.mean()


def wgan_g(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample squared gradient norm of D at real data, averaged (multiply by γ/2 outside).

    ``real_images`` must have ``requires_grad=True`` before D was applied.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """WGAN-GP: E[(‖∇D(x̂)‖₂ − 1)²] on random interpolates x̂ between real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed, c).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


LOSSES = {
    "hinge": (hinge_d, hinge_g),
    "logistic": (logistic_d, logistic_ns_g),
    "wgan": (wgan_d, wgan_g),
}


def get_loss(name: str):
    """(d_loss, g_loss) for a loss name; raises with the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None
