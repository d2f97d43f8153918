"""GAN losses and regularisers against values computed by hand."""

import math

import pytest
import torch
from torch import nn

from gan_models import losses


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hinge():
    # mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, .3])) = mean(0, .5) + mean(0, 1.3) = 0.25 + 0.65
    assert losses.hinge_d(t(2.0, 0.5), t(-2.0, 0.3)).item() == pytest.approx(0.9)
    assert losses.hinge_g(t(1.0, -3.0)).item() == pytest.approx(1.0)


def test_logistic_is_softplus():
    ln3 = math.log(3.0)
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(1 + 1/3) = ln(4/3), for real [0, ln3] and fake [0, -ln3] alike
    d = losses.logistic_d(t(0.0, ln3), t(0.0, -ln3)).item()
    assert d == pytest.approx(math.log(2) + math.log(4 / 3))
    assert losses.logistic_ns_g(t(0.0, ln3)).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    # no overflow at confident logits: D right with margin 100 costs ~e^-100
    confident = losses.logistic_d(torch.tensor([100.0]), torch.tensor([-100.0]))
    assert torch.isfinite(confident) and confident.item() < 1e-30


def test_wgan():
    assert losses.wgan_d(t(1.0, 3.0), t(-1.0, 0.5)).item() == pytest.approx(-0.25 - 2.0)
    assert losses.wgan_g(t(-1.0, 0.5)).item() == pytest.approx(0.25)


def test_get_loss_pairs_and_unknown_name():
    assert losses.get_loss("hinge") == (losses.hinge_d, losses.hinge_g)
    assert losses.get_loss("logistic") == (losses.logistic_d, losses.logistic_ns_g)
    assert losses.get_loss("wgan") == (losses.wgan_d, losses.wgan_g)
    with pytest.raises(ValueError, match=r"unknown loss 'lsgan'; valid: hinge, logistic, wgan"):
        losses.get_loss("lsgan")


class Linear(nn.Module):
    """D(x, c) = w·x per sample, so ∇ₓD = w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x, c=None):
        return (x * self.w).flatten(1).sum(1)


def test_r1_on_linear_D_is_squared_weight_norm():
    w = t(1.0, 2.0, 2.0, 0.0).reshape(1, 2, 2)  # ‖w‖² = 9
    D = Linear(w)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert losses.r1_penalty(x, D(x)).item() == pytest.approx(9.0)
    # 2-D inputs (feature vectors) work too
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert losses.r1_penalty(v, v @ t(1.0, 2.0, 2.0, 0.0)).item() == pytest.approx(9.0)


def test_gradient_penalty_on_linear_D():
    w = t(1.0, 2.0, 2.0, 0.0).reshape(1, 2, 2)  # ‖w‖ = 3 → (3 − 1)² = 4 at every interpolate
    D = Linear(w)
    real, fake = torch.randn(2, 6, 1, 2, 2, dtype=torch.float64)
    gp = losses.gradient_penalty(D, real, fake, None, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx(4.0)
    assert losses.GP_WEIGHT == 10.0
    assert losses.default_gp_weight("wgan") == losses.GP_WEIGHT and losses.default_gp_weight("hinge") == 0.0
    # the penalty trains D: d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w/‖w‖ = 4w/3
    gp.backward()
    torch.testing.assert_close(D.w.grad, 4 * w / 3)
    # a 1-Lipschitz linear critic pays nothing
    assert losses.gradient_penalty(Linear(w / 3), real, fake, None).item() == pytest.approx(0.0, abs=1e-12)
