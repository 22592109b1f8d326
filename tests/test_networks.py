import math

import pytest
import torch
import torch.nn.functional as F

from progan.model.layers import EqualizedConv2d, EqualizedLinear, MinibatchStddev, PixelNorm
from progan.model.networks import Discriminator, Generator, feature_maps, resolutions_up_to, set_trainable


def count(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    kw = dict(max_resolution=64, fmap_base=256, fmap_max=32)
    return Generator(latent_size=32, **kw), Discriminator(**kw)


def test_feature_maps_follow_the_paper():
    assert [feature_maps(r) for r in resolutions_up_to(1024)] == [512, 512, 512, 512, 256, 128, 64, 32, 16]


def test_shapes_at_every_resolution(small):
    G, D = small
    z = torch.randn(4, 32)
    for res in resolutions_up_to(64):
        for alpha in (0.0, 0.3, 1.0):
            img = G(z, res, alpha)
            assert img.shape == (4, 3, res, res)
            assert D(img, res, alpha).shape == (4,)


def test_parameter_counts_match_table_2_at_1024():
    G, D = Generator(), Discriminator()
    # the final networks: every block and the 1024x1024 toRGB / fromRGB only
    g_final = count(p for n, p in G.named_parameters() if not n.startswith("to_rgb.") or n.startswith("to_rgb.1024."))
    d_final = count(p for n, p in D.named_parameters() if not n.startswith("from_rgb.") or n.startswith("from_rgb.1024."))
    # official code (tkarras/progressive_growing_of_gans networks.py), paper Table 2: 23.1M each
    assert abs(g_final - 23_071_507) / 23_071_507 < 0.005, g_final
    assert abs(d_final - 23_077_137) / 23_077_137 < 0.005, d_final
    assert round(g_final / 1e6, 1) == 23.1 and round(d_final / 1e6, 1) == 23.1
    assert count(G.blocks["4"].parameters()) == 4_194_816 + 2_359_808


def test_equalized_lr_scales_weights_by_he_constant():
    torch.manual_seed(1)
    conv = EqualizedConv2d(64, 32, 3)
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.05)  # stored N(0, 1)
    x = torch.randn(2, 64, 8, 8)
    expected = F.conv2d(x, conv.weight * math.sqrt(2 / (64 * 9)), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    lin = EqualizedLinear(512, 10, gain=1.0)
    torch.testing.assert_close(lin(torch.ones(1, 512)), (lin.weight.sum(1) / math.sqrt(512))[None])
    # He init makes unit-variance inputs keep their scale through the layer (before the ReLU gain)
    y = EqualizedConv2d(256, 256, 3, gain=1.0)(torch.randn(8, 256, 16, 16))
    assert y[:, :, 1:-1, 1:-1].std().item() == pytest.approx(1.0, rel=0.1)


def test_pixel_norm_gives_unit_rms_per_pixel():
    x = torch.randn(3, 16, 5, 5) * 7 + 2
    y = PixelNorm()(x)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(3, 5, 5))
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))


def test_minibatch_stddev_channel_is_the_group_stddev():
    torch.manual_seed(2)
    x = torch.randn(8, 5, 4, 4)
    y = MinibatchStddev(group_size=4)(x)
    assert y.shape == (8, 6, 4, 4)
    torch.testing.assert_close(y[:, :5], x)
    for g in range(2):  # groups are consecutive samples 0-3 and 4-7
        group = x[4 * g:4 * g + 4].double()
        expected = group.std(dim=0, unbiased=False).mean().item()
        assert torch.allclose(y[4 * g:4 * g + 4, 5], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    # a batch of 6 with group 4 falls back to groups of gcd(6, 4) = 2
    assert MinibatchStddev(4)(torch.randn(6, 5, 4, 4)).shape == (6, 6, 4, 4)


def test_fade_in_alpha_zero_is_the_upsampled_previous_resolution(small):
    G, D = small
    z = torch.randn(4, 32)
    for res in (8, 16, 32, 64):
        prev = G(z, res // 2, 1.0)
        torch.testing.assert_close(G(z, res, 0.0), F.interpolate(prev, scale_factor=2, mode="nearest"))
        img = torch.randn(4, 3, res, res)
        torch.testing.assert_close(D(img, res, 0.0), D(F.avg_pool2d(img, 2), res // 2, 1.0))
    # alpha in between is the linear blend
    old, new = F.interpolate(G(z, 16, 1.0), scale_factor=2), G(z, 32, 1.0)
    torch.testing.assert_close(G(z, 32, 0.25), old + 0.25 * (new - old), atol=1e-5, rtol=1e-4)


def test_generator_output_is_linear_not_tanh(small):
    G, _ = small
    assert not any(isinstance(m, torch.nn.Tanh) for m in G.modules())


def test_trainable_set_matches_what_the_forward_uses(small):
    G, D = small
    for res in (4, 16):
        for fading in (False, True):
            for net, x in ((G, torch.randn(4, 32)), (D, torch.randn(4, 3, res, res))):
                set_trainable(net, res, fading)
                net.zero_grad(set_to_none=True)
                net(x, res, 0.5 if fading and res > 4 else 1.0).sum().backward()
                trainable = {n for n, p in net.named_parameters() if p.requires_grad}
                with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
                assert trainable == with_grad
    G.requires_grad_(True)
    D.requires_grad_(True)


def test_bad_resolution_is_refused(small):
    G, _ = small
    with pytest.raises(ValueError, match="resolution 12"):
        G(torch.randn(1, 32), 12)
    with pytest.raises(ValueError, match="resolution 128"):
        G(torch.randn(1, 32), 128)
