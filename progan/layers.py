"""The paper's building blocks: equalised learning rate, pixelwise norm, minibatch stddev."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from progan.winograd import winograd_conv3x3, winograd_pays

LRELU_GAIN = math.sqrt(2.0)


class EqualizedConv2d(nn.Module):
    """Conv with weights drawn N(0, 1) and scaled at run time by the He constant gain/sqrt(fan_in),
    so Adam's per-parameter step sizes act alike on every layer (paper section 4.1)."""

    # 3x3 convolutions on the CPU by Winograd F(2x2, 3x3) where that is faster (progan/winograd.py);
    # use_cpu_winograd(module, False) keeps every layer on F.conv2d's direct kernels
    cpu_winograd = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 gain: float = LRELU_GAIN, padding: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_winograd and winograd_pays(x, self.weight, self.padding):
            return torch.add(self.bias[:, None, None], winograd_conv3x3(x, self.weight, self.scale))
        # conv(x, w * scale) + b, with the scale applied to the output instead: the same maths
        # without a scaled copy of the weight (and its backward) in every call, which at 8x8 and
        # below is a larger tensor than the output
        k = self.weight.shape[-1]
        if self.padding == 0 and k > 1 and x.shape[-2:] == (k, k):
            # a k x k convolution over a k x k map without padding (the critic's 4x4 conv) is a
            # dense layer over the flattened map: one GEMM, also in the penalty's double backward,
            # where the convolution kernels are slow for a 1x1 output
            y = F.linear(x.flatten(1), self.weight.flatten(1))[:, :, None, None]
        else:
            y = F.conv2d(x, self.weight, None, padding=self.padding)
        return torch.add(self.bias[:, None, None], y, alpha=self.scale)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, scale={self.scale:.4g}"


def use_cpu_winograd(module: nn.Module, enabled: bool) -> None:
    """Turns the Winograd path of every EqualizedConv2d in `module` on or off (model.cpu_winograd)."""
    for layer in module.modules():
        if isinstance(layer, EqualizedConv2d):
            layer.cpu_winograd = enabled


class EqualizedLinear(nn.Module):
    """Dense layer with the same run-time He scaling as EqualizedConv2d."""

    def __init__(self, in_features: int, out_features: int, gain: float = LRELU_GAIN, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, scale={self.scale:.4g}"


class _LeakyReLUFn(torch.autograd.Function):
    """leaky_relu, in place on its input (always a fresh conv/dense output here, which nothing
    else reads). Its backward is leaky_relu_backward on the *detached* output: the same values
    as autograd's, but in a double backward (the gradient penalty) nothing flows back into the
    activation, whose true second derivative is zero; autograd's own formula sends a
    zeros_like tensor there, which then runs through the layers below as full convolution
    backward passes on zeros. An undefined incoming gradient (what a convolution's double
    backward gives its input) likewise stays undefined instead of becoming zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.mark_dirty(x)
        ctx.set_materialize_grads(False)  # an undefined gradient stays undefined, not zeros
        y = torch.nn.functional.leaky_relu_(x, slope)
        ctx.save_for_backward(y)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None
        (y,) = ctx.saved_tensors
        # y > 0 exactly where the input was > 0 (slope > 0), so this is autograd's formula
        return torch.ops.aten.leaky_relu_backward(grad, y.detach(), ctx.slope, True), None


class LeakyReLU(nn.LeakyReLU):
    """nn.LeakyReLU(0.2) computed in place (see _LeakyReLUFn); only for inputs that are fresh
    intermediate results (a leaf that requires grad or a tensor read elsewhere must not come here)."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and x.is_leaf:
            return F.leaky_relu(x, self.negative_slope)
        return _LeakyReLUFn.apply(x, self.negative_slope)


class PixelNorm(nn.Module):
    """Normalises each pixel's feature vector to unit length (paper section 4.2)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


class MinibatchStddev(nn.Module):
    """Appends one feature map: the stddev of each feature over a group of samples, averaged
    over features and pixels (paper section 3). Groups are consecutive samples, so a batch
    split into contiguous per-worker shares (multiples of the group size) forms the same groups
    as the whole batch on one worker."""

    def __init__(self, group_size: int = 4, eps: float = 1e-8):
        super().__init__()
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if g <= 1 or n % g:
            g = 1 if g <= 1 else math.gcd(n, g)
        if g <= 1:  # a stddev over one sample is zero; keep the channel so shapes do not change
            return torch.cat([x, x.new_zeros(n, 1, h, w)], dim=1)
        y = x.reshape(n // g, g, c, h, w)
        y = (y - y.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)       # variance over the group
        y = torch.sqrt(y + self.eps).mean(dim=(1, 2, 3))               # one number per group
        y = y.repeat_interleave(g).reshape(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, y], dim=1)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)
