"""The paper's building blocks: equalised learning rate, pixelwise norm, minibatch stddev."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from progan.model import conv2d_gradfix

LRELU_GAIN = math.sqrt(2.0)


class EqualizedConv2d(nn.Module):
    """Conv with weights drawn N(0, 1) and scaled at run time by the He constant gain/sqrt(fan_in),
    so Adam's per-parameter step sizes act alike on every layer (paper section 4.1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 gain: float = LRELU_GAIN, padding: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv(x, w * scale) + b, with the scale applied to the output instead: the same maths
        # without a scaled copy of the weight (and its backward) in every call, which at 8x8 and
        # below is a larger tensor than the output
        k = self.weight.shape[-1]
        if self.padding == 0 and k > 1 and x.shape[-2:] == (k, k):
            # a k x k convolution over a k x k map without padding (the critic's 4x4 conv) is a
            # dense layer over the flattened map: one GEMM, also in the penalty's double backward,
            # where the convolution kernels are slow for a 1x1 output
            y = F.linear(x.flatten(1), self.weight.flatten(1))[:, :, None, None]
        elif conv2d_gradfix.active(x):
            # on CUDA: derivatives of every order are ordinary conv kernels (no feature-map
            # filter in the penalty's double backward); the CPU keeps F.conv2d
            y = conv2d_gradfix.conv2d(x, self.weight, self.padding)
        else:
            y = F.conv2d(x, self.weight, None, padding=self.padding)
        return self._bias_scale(y)

    def forward_upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """self(upsample2x(x)) for a 3x3 layer with padding 1, as one transposed convolution
        (upscale2d_conv2d): the same maths, without the 4x larger upsampled input."""
        if self.weight.shape[-1] != 3 or self.padding != 1:
            raise ValueError("forward_upsampled: a 3x3 convolution with padding 1 only")
        return self._bias_scale(upscale2d_conv2d(x, self.weight))

    def _bias_scale(self, y: torch.Tensor) -> torch.Tensor:
        # in y's dtype: under bf16 autocast the convolution's output is bf16, and an fp32 bias
        # would promote it (and every activation after it) to fp32
        return torch.add(in_dtype_of(self.bias, y)[:, None, None], y, alpha=self.scale)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, scale={self.scale:.4g}"


def low_precision(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def in_dtype_of(param: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`param` cast to y's dtype where they differ (autocast), else `param` itself (no op)."""
    return param if param.dtype == y.dtype else param.to(y.dtype)


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


class LeakyReLU(nn.LeakyReLU):
    """nn.LeakyReLU(0.2) in place. Its inputs are always fresh conv/dense outputs that nothing
    else reads, and autograd's in-place leaky ReLU takes its backward from the output, so no
    input copy is kept; it costs what the hand-written autograd Function that stood here did
    (bench/train_step.py on the demo's shapes) and less than the out-of-place module."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__(negative_slope, inplace=True)


class PixelNorm(nn.Module):
    """Normalises each pixel's feature vector to unit length (paper section 4.2)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if low_precision(x):  # bf16/fp16: the mean of squares accumulated in fp32, the output in x's dtype
            return x * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps).to(x.dtype)
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

    def group(self, n: int) -> int:
        """The group size a batch of n samples is split into: group_size, else (n not a multiple of
        it) gcd(n, group_size); 1 (no stddev) for group_size <= 1 or n == 1."""
        g = min(self.group_size, n)
        if g <= 1 or n % g:
            g = 1 if g <= 1 else math.gcd(n, g)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.group(n)
        if g <= 1:  # a stddev over one sample is zero; keep the channel so shapes do not change
            return torch.cat([x, x.new_zeros(n, 1, h, w)], dim=1)
        # bf16/fp16: the statistics in fp32, the appended channel in x's dtype
        y = (x.float() if low_precision(x) else x).reshape(n // g, g, c, h, w)
        y = (y - y.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)       # variance over the group
        y = torch.sqrt(y + self.eps).mean(dim=(1, 2, 3))               # one number per group
        y = y.to(x.dtype).repeat_interleave(g).reshape(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, y], dim=1)


# ---------------------------------------------------------------- fused resampling convolutions
# The official code's fused_scale (networks.py upscale2d_conv2d, conv2d_downscale2d): a nearest 2x
# upsample then a 3x3 convolution (padding 1) is one 4x4 stride-2 transposed convolution, and a 3x3
# convolution then a 2x2 average pool is one 4x4 stride-2 convolution, each with a kernel derived
# from the 3x3 one (zero-padded to 5x5, the four 4x4 corners summed). Both are linear in x and in
# the weight, so values and derivatives of every order are those of the two-op form.

_fused: bool | None = None  # None: on for CUDA tensors, off elsewhere


@contextlib.contextmanager
def fused_resampling(enabled: bool | None) -> Iterator[None]:
    """Within the block G's fused upsample+conv is on (True) or off (False) on every device;
    None: the default (CUDA only: on the CPU the two-op form measured faster)."""
    global _fused
    before, _fused = _fused, enabled
    try:
        yield
    finally:
        _fused = before


def fused_resampling_active(x: torch.Tensor) -> bool:
    return x.is_cuda if _fused is None else _fused


def _corner_sum(weight: torch.Tensor) -> torch.Tensor:
    """[o, i, 3, 3] -> [o, i, 4, 4]: the 3x3 kernel zero-padded by 1, its four 4x4 corners summed."""
    w = F.pad(weight, (1, 1, 1, 1))
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


def upscale2d_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.conv2d(upsample2x(x), weight, padding=1) for a 3x3 `weight` [out, in, 3, 3], as one
    stride-2 transposed convolution with 4/9 of the multiply-adds. conv_transpose2d scatters
    rather than correlates, so the derived kernel is flipped (the official TF code needs no flip)."""
    w = _corner_sum(weight).flip(-2, -1).transpose(0, 1)
    return F.conv_transpose2d(x, w, None, stride=2, padding=1)


def conv2d_downscale2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """downsample2x(F.conv2d(x, weight, padding=1)) for a 3x3 `weight`, as one 4x4 stride-2
    convolution (even input sides). Not used by the critic: its blocks pool after the leaky ReLU
    (conv, bias, act, pool), which a linear fusion cannot reproduce exactly."""
    return F.conv2d(x, _corner_sum(weight) * 0.25, None, stride=2, padding=1)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def fade_reals(reals: torch.Tensor, alpha: float) -> torch.Tensor:
    """During a fade-in the reals are blended like G's output: the half-resolution image
    (2x2 average, nearest upsampled) mixed with the full one by alpha (official process_reals)."""
    if alpha >= 1.0:
        return reals
    return torch.lerp(upsample2x(downsample2x(reals)), reals, alpha)
