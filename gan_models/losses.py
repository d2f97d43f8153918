"""GAN objectives and gradient regularisers.

Adversarial losses take discriminator logits (any shape; averaged over all elements) and return a scalar to minimise:

=============  ====================================================  ====================================
name           D loss                                                G loss
=============  ====================================================  ====================================
``hinge``      E[relu(1 − D(x))] + E[relu(1 + D(G(z)))]  (BigGAN)    −E[D(G(z))]
``logistic``   E[softplus(D(G(z)))] + E[softplus(−D(x))] (StyleGAN2)  E[softplus(−D(G(z)))] (non-saturating)
``wgan``       E[D(G(z))] − E[D(x)]                                   −E[D(G(z))]
=============  ====================================================  ====================================

``get_loss(name)`` returns the ``(d_loss, g_loss)`` pair. ``wgan`` is only a proper critic objective together with a
Lipschitz constraint: add ``GP_WEIGHT · gradient_penalty(...)`` (WGAN-GP, Gulrajani et al. 2017, λ = 10) to the D
loss (``default_gp_weight``).

Regularisers (add to the D loss):

- ``r1_penalty(x, D(x))`` = E‖∇ₓD(x)‖² at real data, unweighted; the R1 term is ``γ/2 · r1_penalty`` (Mescheder et
  al. 2018). γ has no universal default: StyleGAN2 uses 10 at 1024² and NVlabs' heuristic
  ``0.0002 · resolution² / batch`` (see ``gan_models.stylegan2.HParams.resolved_r1_gamma``).
- ``gradient_penalty(D, real, fake, c)`` = E[(‖∇D(x̂)‖₂ − 1)²] at random interpolates x̂, unweighted; the WGAN-GP
  term is ``λ · gradient_penalty`` with λ = ``GP_WEIGHT`` = 10.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GP_WEIGHT = 10.0
"""WGAN-GP's λ (Gulrajani et al. 2017): the D loss is E[D(G(z))] − E[D(x)] + λ · gradient_penalty."""


def hinge_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BigGAN's discriminator hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: −E[D(G(z))]."""
    return -fake_logits.mean()


def logistic_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """StyleGAN2's non-saturating logistic loss for D: softplus(D(G(z))) + softplus(-D(x))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def logistic_ns_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: E[softplus(−D(G(z)))] = −E[log σ(D(G(z)))]."""
    return F.softplus(-fake_logits).mean()


def wgan_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Wasserstein critic loss E[D(G(z))] − E[D(x)]; add ``GP_WEIGHT · gradient_penalty`` (WGAN-GP)."""
    return fake_logits.mean() - real_logits.mean()


def wgan_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """Wasserstein generator loss: −E[D(G(z))]."""
    return -fake_logits.mean()


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """E over samples of ‖∇ₓD(x)‖² at real data, unweighted (multiply by γ/2 outside).

    ``real_images`` (N×…) must have ``requires_grad=True`` before D was applied; ``real_logits`` holds one logit
    per sample (or any shape whose sum is differentiable per sample). The graph is kept, so the result can be
    back-propagated into D's parameters.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.flatten(1).square().sum(dim=1).mean() + _every_parameter(real_logits)


def gradient_penalty(
    D: Callable[..., torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    c: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP: E[(‖∇D(x̂)‖₂ − 1)²] on random interpolates x̂ = αx + (1 − α)x̃, α ~ U[0, 1] per sample; unweighted.

    ``D(x, c)`` is called on the interpolates (``c`` is passed through, ``None`` for unconditional D). Multiply the
    result by ``GP_WEIGHT`` (λ = 10). ``generator`` makes α reproducible; ``alpha`` (N×1×…) gives it outright, e.g.
    slices of one draw for the whole batch when it is split into micro-batches.
    """
    if alpha is None:
        shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        device = generator.device if generator is not None else real.device
        alpha = torch.rand(shape, generator=generator, device=device, dtype=real.dtype).to(real.device)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    logits = D(mixed, c)
    (grad,) = torch.autograd.grad(logits.sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean() + _every_parameter(logits)


def _every_parameter(logits: torch.Tensor) -> torch.Tensor:
    """0, through D's output: an input-gradient penalty never reaches parameters that only shift D's output (its
    final bias), and DDP, which expects a gradient for every parameter, would otherwise never finish that backward's
    reduction ("Expected to have finished reduction in the prior iteration" at the next forward)."""
    return logits.float().mean() * 0


# Each D loss as (term on real logits, term on fake logits), for recipes that score reals and fakes in separate
# passes (StyleGAN2 keeps minibatch-stddev groups pure that way); the pair sums to the D loss above.
D_TERMS = {
    "hinge": (lambda real: F.relu(1.0 - real).mean(), lambda fake: F.relu(1.0 + fake).mean()),
    "logistic": (lambda real: F.softplus(-real).mean(), lambda fake: F.softplus(fake).mean()),
    "wgan": (lambda real: -real.mean(), lambda fake: fake.mean()),
}

LOSSES = {
    "hinge": (hinge_d, hinge_g),
    "logistic": (logistic_d, logistic_ns_g),
    "wgan": (wgan_d, wgan_g),
}


def default_gp_weight(loss: str) -> float:
    """The gradient-penalty weight a loss needs by default: λ = 10 for ``wgan`` (WGAN-GP; without a Lipschitz
    constraint the critic's objective is unbounded), 0 for the others."""
    get_loss(loss)
    return GP_WEIGHT if loss == "wgan" else 0.0


def get_loss(name: str):
    """(d_loss, g_loss) for a loss name; raises with the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None
