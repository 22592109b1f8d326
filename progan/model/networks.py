"""Generator and Discriminator of Karras et al. 2018, Table 2, growing from 4x4 to `max_resolution`.

Both networks hold every resolution's layers from the start; `forward(x, resolution, alpha)`
runs the part that the current phase uses. During a fade-in (alpha < 1) the new block's output
is blended with the previous resolution's path (upsampled in G, downsampled in D). The modules
hold no training state: the schedule, optimisers and EMA live in the training loop.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from progan.model.layers import (LRELU_GAIN, EqualizedConv2d, EqualizedLinear, LeakyReLU, MinibatchStddev,
                                 PixelNorm, downsample2x, fused_resampling_active, in_dtype_of, upsample2x)


def feature_maps(resolution: int, fmap_base: int = 8192, fmap_max: int = 512) -> int:
    """Channels at a resolution: the official nf(log2(res) - 1) = min(fmap_base / 2**stage, fmap_max)."""
    stage = int(math.log2(resolution)) - 1
    return max(1, min(int(fmap_base / 2 ** stage), fmap_max))


def resolutions_up_to(max_resolution: int) -> list[int]:
    return [2 ** k for k in range(2, int(math.log2(max_resolution)) + 1)]


def _check_resolution(resolution: int, max_resolution: int) -> None:
    if resolution not in resolutions_up_to(max_resolution):
        raise ValueError(f"resolution {resolution}: expected a power of two in 4..{max_resolution}")


class _ConvAct(nn.Sequential):
    """Equalised conv, leaky ReLU 0.2, and (in G) pixelwise normalisation."""

    def __init__(self, cin: int, cout: int, kernel: int, pixel_norm: bool, padding: int | None = None):
        layers = [EqualizedConv2d(cin, cout, kernel, padding=padding), LeakyReLU(0.2)]
        if pixel_norm:
            layers.append(PixelNorm())
        super().__init__(*layers)


class _LatentTo4x4(nn.Module):
    """G's first block: dense latent -> 4x4 x C (the official gain sqrt(2)/4, one bias per
    channel as in the official code), then a 3x3 conv."""

    def __init__(self, latent_size: int, channels: int):
        super().__init__()
        self.channels = channels
        self.dense = EqualizedLinear(latent_size, channels * 16, gain=LRELU_GAIN / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))
        self.act = nn.Sequential(LeakyReLU(0.2), PixelNorm())
        self.conv = _ConvAct(channels, channels, 3, pixel_norm=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dense(z).view(-1, self.channels, 4, 4)
        x = x + in_dtype_of(self.bias, x)  # in the dense output's dtype (bf16 under autocast)
        return self.conv(self.act(x))


class _GrowBlock(nn.Sequential):
    """G block: nearest 2x upsample, two 3x3 convs. Where fused resampling is on (CUDA by default,
    layers.fused_resampling), the upsample and the first conv run as one transposed convolution
    (the official fused_scale): the same maths with 4/9 of the multiply-adds."""

    def __init__(self, cin: int, cout: int):
        super().__init__(_ConvAct(cin, cout, 3, pixel_norm=True), _ConvAct(cout, cout, 3, pixel_norm=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_resampling_active(x):
            return super().forward(upsample2x(x))
        first = self[0]
        x = first[0].forward_upsampled(x)
        for module in list(first)[1:]:
            x = module(x)
        return self[1](x)


class _ShrinkBlock(nn.Sequential):
    """D block: two 3x3 convs, 2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__(_ConvAct(cin, cin, 3, pixel_norm=False), _ConvAct(cin, cout, 3, pixel_norm=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample2x(super().forward(x))


class _CriticHead(nn.Module):
    """D at 4x4: minibatch stddev, 3x3 conv, 4x4 conv (a dense layer over the 4x4 map), linear."""

    def __init__(self, channels: int, out_channels: int, mbstd_group_size: int):
        super().__init__()
        self.mbstd = MinibatchStddev(mbstd_group_size)
        extra = 1 if mbstd_group_size > 1 else 0
        self.conv = _ConvAct(channels + extra, channels, 3, pixel_norm=False)
        self.conv4x4 = _ConvAct(channels, out_channels, 4, pixel_norm=False, padding=0)
        self.linear = EqualizedLinear(out_channels, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mbstd.group_size > 1:
            x = self.mbstd(x)
        x = self.conv4x4(self.conv(x))
        return self.linear(x.flatten(1)).view(-1)


class Generator(nn.Module):
    def __init__(self, max_resolution: int = 1024, latent_size: int = 512, fmap_base: int = 8192,
                 fmap_max: int = 512, num_channels: int = 3):
        super().__init__()
        self.max_resolution = max_resolution
        self.latent_size = latent_size
        nf = lambda res: feature_maps(res, fmap_base, fmap_max)  # noqa: E731
        self.normalize_latent = PixelNorm()
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        for res in resolutions_up_to(max_resolution):
            self.blocks[str(res)] = (_LatentTo4x4(latent_size, nf(4)) if res == 4
                                     else _GrowBlock(nf(res // 2), nf(res)))
            self.to_rgb[str(res)] = EqualizedConv2d(nf(res), num_channels, 1, gain=1.0)

    def modules_in_use(self, resolution: int, fading: bool) -> list[nn.Module]:
        return _modules_in_use(self.blocks, self.to_rgb, resolution, fading)

    def forward(self, z: torch.Tensor, resolution: int, alpha: float = 1.0) -> torch.Tensor:
        _check_resolution(resolution, self.max_resolution)
        x = self.blocks["4"](self.normalize_latent(z))
        for res in resolutions_up_to(resolution)[1:-1]:
            x = self.blocks[str(res)](x)
        if resolution == 4:
            return self.to_rgb["4"](x)
        new = self.to_rgb[str(resolution)](self.blocks[str(resolution)](x))
        if alpha >= 1.0:
            return new
        old = upsample2x(self.to_rgb[str(resolution // 2)](x))
        return torch.lerp(old, new, alpha)


class Discriminator(nn.Module):
    """The critic. `joins(n)`: whether one call on reals and fakes concatenated (n each) equals
    two calls (the minibatch-stddev groups never straddle the two halves)."""

    def __init__(self, max_resolution: int = 1024, fmap_base: int = 8192, fmap_max: int = 512,
                 num_channels: int = 3, mbstd_group_size: int = 4):
        super().__init__()
        self.max_resolution = max_resolution
        nf = lambda res: feature_maps(res, fmap_base, fmap_max)  # noqa: E731
        self.from_rgb = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        for res in resolutions_up_to(max_resolution):
            self.from_rgb[str(res)] = nn.Sequential(EqualizedConv2d(num_channels, nf(res), 1), LeakyReLU(0.2))
            self.blocks[str(res)] = (_CriticHead(nf(4), feature_maps(2, fmap_base, fmap_max), mbstd_group_size)
                                     if res == 4 else _ShrinkBlock(nf(res), nf(res // 2)))

    def modules_in_use(self, resolution: int, fading: bool) -> list[nn.Module]:
        return _modules_in_use(self.blocks, self.from_rgb, resolution, fading)

    def joins(self, n: int) -> bool:
        """True if D(cat([a, b])) == cat([D(a), D(b)]) for batches a, b of n samples each: every
        other layer is per-sample, and minibatch stddev groups consecutive samples, so the two
        calls form the same groups as the one call when the group size for n is that for 2n
        (it divides n, so no group straddles the halves)."""
        mbstd = self.blocks["4"].mbstd
        return n >= 1 and mbstd.group(n) == mbstd.group(2 * n)

    def forward(self, img: torch.Tensor, resolution: int, alpha: float = 1.0) -> torch.Tensor:
        _check_resolution(resolution, self.max_resolution)
        x = self.from_rgb[str(resolution)](img)
        for res in reversed(resolutions_up_to(resolution)):
            x = self.blocks[str(res)](x)
            if res == resolution > 4 and alpha < 1.0:
                old = self.from_rgb[str(resolution // 2)](downsample2x(img))
                x = torch.lerp(old, x, alpha)
        return x


def _modules_in_use(blocks: nn.ModuleDict, rgb: nn.ModuleDict, resolution: int, fading: bool) -> list[nn.Module]:
    """The submodules a forward at this resolution touches (for freezing the rest under DDP): the
    blocks up to it, its RGB layer and, during a fade-in, the RGB layer of the one below."""
    used: list[nn.Module] = [blocks[str(r)] for r in resolutions_up_to(resolution)]
    used.append(rgb[str(resolution)])
    if fading and resolution > 4:
        used.append(rgb[str(resolution // 2)])
    return used


def set_trainable(model: nn.Module, resolution: int, fading: bool) -> None:
    """Only the parameters this phase uses require gradients, so DDP (find_unused_parameters=False)
    and Adam see exactly the parameters that get gradients (DDP skips parameters that need none;
    with all of them requiring grad, the first 4x4 step fails on "parameters that were not used
    in producing loss")."""
    model.requires_grad_(False)
    for module in model.modules_in_use(resolution, fading):
        module.requires_grad_(True)
