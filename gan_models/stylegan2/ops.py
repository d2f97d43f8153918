"""Low-level StyleGAN2 operations in plain PyTorch (no custom CUDA kernels).

FIR resampling with a separable low-pass filter, equalised-learning-rate layers, modulated convolution and
minibatch standard deviation, following the maths of Karras et al. 2020 ("Analyzing and Improving the Image Quality
of StyleGAN") and the numbers of NVlabs' reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps activations at unit variance through leaky ReLU, as NVlabs' def_gain


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """The 1-D half of a separable 2-D low-pass filter, normalised so the 2-D filter sums to 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    if f.ndim != 1 or f.numel() < 1:
        raise ValueError(f"resample filter must be a non-empty 1-D list of taps, got {list(taps)}")
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0), gain: float = 1.0
) -> torch.Tensor:
    """Upsample (zero insertion), pad, convolve with the separable FIR ``f`` (outer(f, f)), downsample.

    ``pad`` is (before, after) on both axes, in the upsampled grid; negative values crop.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    # True convolution (not correlation) with the filter; its gain is split evenly between the two axes.
    k = (f.flip(0) * math.sqrt(gain)).to(x.dtype)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c, stride=(1, down))
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c, stride=(down, 1))
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Image-size ×up; the filter's gain up² compensates for the inserted zeros."""
    fw = f.numel()
    return upfirdn2d(x, f, up=up, pad=((fw + up - 1) // 2, (fw - up) // 2), gain=up**2)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    fw = f.numel()
    return upfirdn2d(x, f, down=down, pad=((fw - down + 1) // 2, (fw - down) // 2))


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> torch.Tensor:
    """Convolution with ×2 up- or down-sampling through the FIR filter ``f``, fused where it saves work.

    Conceptually: zero-insert ×up, pad, filter, convolve, keep every down-th pixel. With up, a strided transposed
    convolution does the zero insertion and the convolution at once (a true convolution with ``w``); with down, the
    filter runs first at full resolution and the convolution is strided.
    """
    kw = w.shape[-1]
    if up > 1:
        fw = f.numel()
        # conv_transpose2d wants (in, out/groups, k, k); a grouped weight is stored as (groups·out, in, k, k).
        o, i = w.shape[0] // groups, w.shape[1]
        wt = w.reshape(groups, o, i, kw, kw).transpose(1, 2).reshape(groups * i, o, kw, kw)
        x = F.conv_transpose2d(x, wt, stride=up, groups=groups)
        # The transposed conv already padded kw-1 per side; the rest of the padding, minus the one zero it drops.
        p0 = (fw + up - 1) // 2 + padding - (kw - 1)
        p1 = (fw - up) // 2 + padding - (kw - 1) + (up - 1)
        return upfirdn2d(x, f, pad=(p0, p1), gain=up**2)
    if down > 1:
        fw = f.numel()
        p0 = (fw - down + 1) // 2 + padding
        p1 = (fw - down) // 2 + padding
        if kw == 1:
            return F.conv2d(upfirdn2d(x, f, down=down, pad=(p0, p1)), w, groups=groups)
        return F.conv2d(upfirdn2d(x, f, pad=(p0, p1)), w, stride=down, groups=groups)
    return F.conv2d(x, w, padding=padding, groups=groups)


def bias_act(
    x: torch.Tensor, b: torch.Tensor | None, act: str = "linear", gain: float = 1.0, clamp: float | None = None
) -> torch.Tensor:
    """Bias, activation, gain, clamp; in that order, as NVlabs (``gain`` multiplies the activation's own gain)."""
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        gain = gain * LRELU_GAIN
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}; valid: linear, lrelu")
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class FullyConnectedLayer(nn.Module):
    """Equalised-learning-rate linear layer.

    The weight is stored as N(0, 1)/lr_multiplier and scaled by lr_multiplier/√fan_in at run time, so Adam's
    per-parameter step moves the effective weight lr_multiplier times slower (and the bias too, via bias_gain).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias * self.bias_gain if self.bias is not None else None
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.to(x.dtype).unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return (
            f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, act={self.activation}, gain={self.weight_gain:g}"
        )


class Conv2dLayer(nn.Module):
    """Equalised-learning-rate convolution with optional FIR ×2 up/down-sampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.activation, self.up, self.down, self.conv_clamp = activation, up, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down, padding=self.padding)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=gain, clamp=clamp)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution: scale the weight's input channels by a per-sample style, then (optionally)
    rescale each output channel to unit expected variance (demodulation), which replaces AdaIN.

    ``fused`` folds the per-sample weights into one grouped convolution (one group per sample); otherwise the style
    scales the activations before a shared convolution and the demodulation coefficients scale them after, which is
    the same maths with a batch-shared weight (cheaper to back-propagate through when the batch is large).
    """
    n = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(n, 1, in_ch, 1, 1)  # [N, O, I, k, k]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None  # [N, O]
    if not fused:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding)
        return x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1) if dcoefs is not None else x
    if dcoefs is not None:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, n * in_ch, *x.shape[2:])
    x = conv2d_resample(x, w.reshape(n * out_ch, in_ch, kh, kw).to(x.dtype), resample_filter, up, 1, padding, groups=n)
    return x.reshape(n, out_ch, *x.shape[2:])


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class MinibatchStdLayer(nn.Module):
    """Appends the average standard deviation over groups of ``group_size`` samples as extra feature maps.

    Samples i, i+n, i+2n, … (n = N / group) form a group, as NVlabs' reshape does; this lets D see the diversity of a
    batch and so penalise mode collapse.
    """

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise ValueError(f"batch size {n} is not a multiple of the minibatch-stddev group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over the group
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [n/g, F]: mean stddev over channels and pixels
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
