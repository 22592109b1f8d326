"""3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3) for the CPU.

Each 2x2 output tile comes from a 4x4 input tile through fixed linear transforms around 16
matrix products over the channels, 2.25x fewer multiplications than a direct convolution
(Lavin & Gray 2016; cuDNN picks the same on GPUs). PyTorch's CPU convolutions run oneDNN's
direct kernels, whose weight gradient is especially slow; here every pass is one large batched
GEMM instead. It is built from differentiable torch ops (pad, unfold, matmul, bmm, reshape), so
autograd gives its backward and the gradient penalty's double backward, which are again
Winograd-sized GEMMs. Results equal F.conv2d's within float rounding (relative error ~3e-6 in
float32; the same to 1e-9 in float64, tests/test_winograd.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The F(2x2, 3x3) transforms: input tile d -> B^T d B, filter g -> G g G^T, product m -> A^T m A
_B_T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_G = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
_A_T = [[1, 1, 1, 0], [0, 1, -1, -1]]

# Where it pays on a CPU (python -m bench.conv: forward + backward, 2 EPYC cores with AVX2):
# 512 channels with >= 128 output tiles 1.3-1.75x faster than oneDNN's direct kernels, 256
# channels ~1.1-1.3x; with fewer tiles (512 channels, batch 4 at 4x4: 0.75x) or 64-128 channels
# (the CPU demo: 0.7-0.76x) slower, because the transforms, which only move memory, then cost
# more than the GEMM they shrink.
MIN_CHANNELS = 256
MIN_TILES = 128


@functools.lru_cache(maxsize=8)
def _transforms(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms as matrices on flattened tiles (Kronecker products of the 1-D ones):
    input 16x16, filter 16x9, output 4x16."""
    def kron(m):
        t = torch.tensor(m, dtype=torch.float64)
        return torch.kron(t, t).to(device=device, dtype=dtype)
    return kron(_B_T), kron(_G), kron(_A_T)


def winograd_pays(x: torch.Tensor, weight: torch.Tensor, padding: int) -> bool:
    """Whether conv2d(x, weight, padding=padding) should run here: on the CPU, 3x3 with padding 1
    over an even-sized map, wide enough and with enough tiles for the GEMMs to dominate."""
    out_channels, in_channels, kh, kw = weight.shape
    n, _, h, w = x.shape
    return (x.device.type == "cpu" and (kh, kw) == (3, 3) and padding == 1 and h % 2 == 0 and w % 2 == 0
            and min(in_channels, out_channels) >= MIN_CHANNELS and n * (h // 2) * (w // 2) >= MIN_TILES)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """conv2d(x, weight * scale, padding=1) for even H and W, without bias. The result is in
    channels-last memory layout (an NCHW view of NHWC data), like the networks' activations."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = h // 2, w // 2
    tiles = n * th * tw
    t_in, t_filter, t_out = _transforms(x.device, x.dtype)
    # 4x4 input tiles at stride 2 over the zero-padded NHWC map, tile position flattened first
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))           # n, h+2, w+2, c
    d = padded.unfold(1, 4, 2).unfold(2, 4, 2)                           # n, th, tw, c, 4, 4
    d = d.permute(4, 5, 0, 1, 2, 3).reshape(16, tiles * c)
    v = (t_in @ d).view(16, tiles, c)
    u = ((t_filter * scale) @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(16, c, k)
    m = torch.bmm(v, u)                                                  # 16, tiles, k
    y = (t_out @ m.view(16, tiles * k)).view(2, 2, n, th, tw, k)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, h, w, k)
    return y.permute(0, 3, 1, 2)
