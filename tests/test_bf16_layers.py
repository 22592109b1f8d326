"""bf16 done right (issue 23): under bf16 autocast the activations between layers stay bf16
(biases in the convolution's output dtype; pixel norm and minibatch stddev reduce in fp32 and
return bf16), while the fp32 and float64 paths are bit-identical to the layers as they were."""
import math

import pytest
import torch
import torch.nn.functional as F

from progan.model.layers import EqualizedConv2d, MinibatchStddev, PixelNorm
from progan.model.networks import Discriminator, Generator

BF16 = torch.bfloat16


# ---------------------------------------------------------------- the layers as they were (reference)


def old_conv(layer: EqualizedConv2d, x):
    k = layer.weight.shape[-1]
    if layer.padding == 0 and k > 1 and x.shape[-2:] == (k, k):
        y = F.linear(x.flatten(1), layer.weight.flatten(1))[:, :, None, None]
    else:
        y = F.conv2d(x, layer.weight, None, padding=layer.padding)
    return torch.add(layer.bias[:, None, None], y, alpha=layer.scale)


def old_pixel_norm(x, eps=1e-8):
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def old_mbstd(x, group_size=4, eps=1e-8):
    n, c, h, w = x.shape
    g = min(group_size, n)
    if g <= 1 or n % g:
        g = 1 if g <= 1 else math.gcd(n, g)
    if g <= 1:
        return torch.cat([x, x.new_zeros(n, 1, h, w)], dim=1)
    y = x.reshape(n // g, g, c, h, w)
    y = (y - y.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)
    y = torch.sqrt(y + eps).mean(dim=(1, 2, 3))
    y = y.repeat_interleave(g).reshape(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([x, y], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_and_float64_layers_are_bit_identical_to_before(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 6, 4, 4, dtype=dtype)
    for kernel, padding in ((3, None), (1, None), (4, 0)):
        layer = EqualizedConv2d(6, 5, kernel, padding=padding).to(dtype)
        with torch.no_grad():
            layer.bias.normal_()
        torch.testing.assert_close(layer(x), old_conv(layer, x), rtol=0, atol=0)
    torch.testing.assert_close(PixelNorm()(x), old_pixel_norm(x), rtol=0, atol=0)
    for n in (8, 6, 1):
        torch.testing.assert_close(MinibatchStddev(4)(x[:n]), old_mbstd(x[:n]), rtol=0, atol=0)


def test_bf16_pixel_norm_and_stddev_reduce_in_fp32_and_return_bf16():
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 4, 4) * 3).to(BF16)
    y = PixelNorm()(x)
    assert y.dtype == BF16
    torch.testing.assert_close(y.float(), old_pixel_norm(x.double()).float(), rtol=1e-2, atol=1e-2)
    s = MinibatchStddev(4)(x)
    assert s.dtype == BF16
    torch.testing.assert_close(s.float(), old_mbstd(x.double()).float(), rtol=1e-2, atol=1e-2)


def test_under_bf16_autocast_conv_output_stays_bf16():
    layer = EqualizedConv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=BF16):
        assert layer(torch.randn(2, 3, 5, 5)).dtype == BF16
        assert EqualizedConv2d(4, 2, 4, padding=0)(torch.randn(2, 4, 4, 4)).dtype == BF16


def output_dtypes(net, run):
    """The dtype of every floating-point activation (4-d tensor output) of every submodule."""
    seen, handles = [], []
    for name, module in net.named_modules():
        if module is net:
            continue

        def hook(module, args, out, name=name):
            if torch.is_tensor(out) and out.is_floating_point() and out.dim() == 4:
                seen.append((name, out.dtype, tuple(out.shape)))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.autocast("cpu", dtype=BF16):
            result = run()
    finally:
        for h in handles:
            h.remove()
    return seen, result


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_no_fp32_activation_passes_between_blocks_under_bf16_autocast(alpha):
    torch.manual_seed(0)
    G = Generator(max_resolution=16, latent_size=32, fmap_base=128, fmap_max=32)
    D = Discriminator(max_resolution=16, fmap_base=128, fmap_max=32)
    g_seen, fakes = output_dtypes(G, lambda: G(torch.randn(8, 32), 16, alpha))
    assert fakes.dtype == BF16
    d_seen, scores = output_dtypes(D, lambda: D(fakes.float(), 16, alpha))
    assert scores.dtype == BF16
    assert len(g_seen) > 10 and len(d_seen) > 10
    fp32 = [s for s in g_seen + d_seen if s[1] != BF16]
    assert fp32 == []
