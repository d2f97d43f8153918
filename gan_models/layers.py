"""Small building blocks for BigGAN-style models: spectral-normalised layers, class-conditional BN, self-attention,
orthogonal init and orthogonal regularisation (Brock et al. 2019; maths follows BigGAN-PyTorch's ``layers.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm

INITS = ("ortho", "N02", "xavier")


def init_weight_(weight: torch.Tensor, style: str = "ortho") -> torch.Tensor:
    """BigGAN's weight inits: orthogonal (default), N(0, 0.02) (its CIFAR script), or Xavier-uniform."""
    if style == "ortho":
        return nn.init.orthogonal_(weight)
    if style == "N02":
        return nn.init.normal_(weight, 0.0, 0.02)
    if style == "xavier":
        return nn.init.xavier_uniform_(weight)
    raise ValueError(f"init {style!r} not supported; valid: {', '.join(INITS)}")


def _sn(module: nn.Module, eps: float, init: str) -> nn.Module:
    # Initialise before registering SN so its power-iteration vectors start from the final weight.
    init_weight_(module.weight, init)
    return spectral_norm(module, n_power_iterations=1, eps=eps)


@contextlib.contextmanager
def power_iteration_off(module: nn.Module):
    """Spectral-norm layers reuse their current (u, v) inside the block instead of taking a power-iteration step.

    A training forward normally advances (u, v) once; extra forwards of the same step (micro-batches, gradient
    penalties) must not, so that they see exactly the weights the step's first forward saw.
    """
    layers = [m for m in module.modules() if isinstance(m, _SpectralNorm) and m.training]
    for m in layers:
        m.training = False
    try:
        yield module
    finally:
        for m in layers:
            m.training = True


def sn_conv2d(cin: int, cout: int, kernel_size: int = 3, bias: bool = True, eps: float = 1e-6, init: str = "ortho"):
    """A 'same'-padded conv with spectral norm (one power iteration per training forward)."""
    return _sn(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias), eps, init)


def sn_linear(fin: int, fout: int, bias: bool = True, eps: float = 1e-6, init: str = "ortho"):
    return _sn(nn.Linear(fin, fout, bias=bias), eps, init)


def sn_embedding(num: int, dim: int, eps: float = 1e-6, init: str = "ortho"):
    """Class embedding with spectral norm over the (num × dim) table, as the projection discriminator's."""
    return _sn(nn.Embedding(num, dim), eps, init)


def embedding(num: int, dim: int, init: str = "ortho") -> nn.Embedding:
    """Plain embedding: BigGAN keeps SN off G's class embeddings (SN there was seen to cripple G)."""
    emb = nn.Embedding(num, dim)
    init_weight_(emb.weight, init)
    return emb


class CCBN(nn.Module):
    """Class-conditional BatchNorm: BN without affine, then a per-sample gain (1 + g(y)) and bias b(y).

    With ``shared=True``, ``y`` is a float vector ([shared class embedding ‖ z chunk]) and g, b are bias-free SN
    linears of it; otherwise ``y`` holds int class labels and g, b are plain per-class embeddings.
    """

    def __init__(
        self,
        channels: int,
        cond_dim: int,
        shared: bool = True,
        eps: float = 1e-5,
        sn_eps: float = 1e-6,
        init: str = "ortho",
        momentum: float = 0.1,
    ):
        super().__init__()
        if shared:
            self.gain = sn_linear(cond_dim, channels, bias=False, eps=sn_eps, init=init)
            self.bias = sn_linear(cond_dim, channels, bias=False, eps=sn_eps, init=init)
        else:
            self.gain = embedding(cond_dim, channels, init)
            self.bias = embedding(cond_dim, channels, init)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(y)[:, :, None, None]
        return self.bn(x) * gain + self.bias(y)[:, :, None, None]


class Attention(nn.Module):
    """SAGAN self-attention as released (not as printed): keys/values max-pooled 2×, output scaled by a learnt
    gain that starts at 0 so the block begins as the identity."""

    def __init__(self, ch: int, sn_eps: float = 1e-6, init: str = "ortho"):
        super().__init__()
        if ch < 8:
            raise ValueError(f"attention on {ch} channels not supported; valid: ≥ 8 (it projects to ch // 8)")
        conv = lambda cin, cout: sn_conv2d(cin, cout, 1, bias=False, eps=sn_eps, init=init)  # noqa: E731
        self.theta, self.phi, self.g = conv(ch, ch // 8), conv(ch, ch // 8), conv(ch, ch // 2)
        self.o = conv(ch // 2, ch)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.theta(x).flatten(2)  # N × C/8 × HW
        k = F.max_pool2d(self.phi(x), 2).flatten(2)  # N × C/8 × HW/4
        v = F.max_pool2d(self.g(x), 2).flatten(2)  # N × C/2 × HW/4
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # N × HW × HW/4
        o = (v @ attn.transpose(1, 2)).view(n, c // 2, h, w)
        return x + self.gamma * self.o(o)


def raw_weights(module: nn.Module, skip: Iterable[nn.Parameter] = ()) -> list[nn.Parameter]:
    """Parameters with ≥2 dims (SN layers' un-normalised weights included), minus ``skip``: what ortho reg acts on."""
    skip_ids = {id(p) for p in skip}
    return [p for p in module.parameters() if p.ndim >= 2 and id(p) not in skip_ids]


def ortho_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """BigGAN's off-diagonal orthogonal regulariser Σ ½‖W Wᵀ ⊙ (1 − I)‖²_F (W flattened to rows × rest)."""
    total = 0.0
    for p in params:
        w = p.flatten(1)
        gram = w @ w.t()
        total = total + 0.5 * (gram * (1 - torch.eye(w.shape[0], device=w.device, dtype=w.dtype))).square().sum()
    return torch.as_tensor(total)


@torch.no_grad()
def ortho_reg_(params: Iterable[torch.Tensor], strength: float) -> None:
    """Adds ``strength`` × ∇ortho_penalty to each ``p.grad`` in place (the closed-form 2 (W Wᵀ ⊙ (1 − I)) W, cheaper
    than a second backward), as BigGAN-PyTorch does. Call between ``backward()`` and ``optimizer.step()``."""
    for p in params:
        if p.grad is None:
            continue
        w = p.flatten(1)
        off = (w @ w.t()).fill_diagonal_(0)
        p.grad.add_((off @ w).view_as(p), alpha=2.0 * strength)
