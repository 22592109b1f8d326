"""Issue 23 item 5's exact rewrites, each against today's two-op or two-call form in float64:
the critic on reals and fakes in one call (where the minibatch-stddev groups allow it), G's
nearest upsample + 3x3 conv as one transposed convolution, and the 3x3 conv + 2x2 average pool as
one stride-2 convolution (a function only: the critic pools after its leaky ReLU)."""
import pytest
import torch
import torch.nn.functional as F

from progan.model.layers import (EqualizedConv2d, MinibatchStddev, conv2d_downscale2d, downsample2x,
                                 fused_resampling, fused_resampling_active, upsample2x, upscale2d_conv2d)
from progan.model.losses import WGANGP, LeastSquares, LogisticR1
from progan.model.networks import Discriminator, Generator
from progan.training.training_step import critic_step, make_optimizer

F64 = torch.float64


# ---------------------------------------------------------------- reals and fakes in one critic call


def test_joins_only_where_the_stddev_groups_are_the_same():
    D = Discriminator(max_resolution=8, fmap_base=64, fmap_max=8)
    assert [n for n in range(1, 13) if D.joins(n)] == [4, 8, 12]
    # no stddev layer: any batch joins
    assert all(Discriminator(max_resolution=8, fmap_base=64, fmap_max=8, mbstd_group_size=1).joins(n)
               for n in range(1, 7))
    mbstd = MinibatchStddev(4)
    assert [mbstd.group(n) for n in (1, 2, 3, 4, 6, 8, 12)] == [1, 2, 3, 4, 2, 4, 4]


@pytest.mark.parametrize("n", [2, 4, 6, 8])
def test_one_call_equals_two_exactly_when_joins_says_so(n):
    torch.manual_seed(0)
    D = Discriminator(max_resolution=16, fmap_base=128, fmap_max=16).double()
    a, b = (torch.randn(n, 3, 16, 16, dtype=F64) for _ in range(2))
    one = D(torch.cat([a, b]), 16, 0.5)
    two = torch.cat([D(a, 16, 0.5), D(b, 16, 0.5)])
    if D.joins(n):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
    else:  # groups of the concatenation would differ (or straddle the halves): not the same scores
        assert not torch.allclose(one, two, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", [WGANGP(), LeastSquares(), LogisticR1()], ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_joint_critic_loss_and_gradients_equal_the_two_call_version(loss, alpha):
    torch.manual_seed(0)
    D = Discriminator(max_resolution=16, fmap_base=128, fmap_max=32).double()
    reals, fakes = (torch.randn(8, 3, 16, 16, dtype=F64) for _ in range(2))
    mix = torch.rand(8, 1, 1, 1, dtype=F64)
    extra = {"mix": mix} if isinstance(loss, WGANGP) else {}
    assert D.joins(8)
    out = {}
    for joint in (False, True):
        D.zero_grad(set_to_none=True)
        value, stats = loss.critic_loss(lambda x: D(x, 16, alpha), reals, fakes, resolution_scale=2,
                                        joint=joint, **extra)
        value.backward()
        out[joint] = (value.detach(), stats, {n: p.grad.clone() for n, p in D.named_parameters()
                                              if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=1e-12)
    for key in out[False][1]:
        torch.testing.assert_close(out[True][1][key], out[False][1][key], rtol=1e-12, atol=1e-12, msg=key)
    assert out[True][2].keys() == out[False][2].keys() and out[False][2]
    for name, grad in out[False][2].items():
        torch.testing.assert_close(out[True][2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_critic_step_joint_equals_two_calls_after_the_optimiser_step():
    before = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        results = {}
        for joint in (False, True):
            torch.manual_seed(0)
            G = Generator(max_resolution=8, latent_size=16, fmap_base=64, fmap_max=16)
            D = Discriminator(max_resolution=8, fmap_base=64, fmap_max=16)
            opt_d = make_optimizer(D, 0.001, 0.0, 0.99, 1e-8)
            reals = torch.randn(8, 3, 8, 8)
            torch.manual_seed(1)
            stats = critic_step(G, D, opt_d, WGANGP(), reals, 8, 0.5, 16, 1.0, joint=joint)
            results[joint] = (stats, [p.detach().clone() for p in D.parameters()])
    finally:
        torch.set_default_dtype(before)
    for key in ("loss_d", "grad_penalty", "grad_norm", "score_real", "score_fake"):
        torch.testing.assert_close(results[True][0][key], results[False][0][key], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- fused resampling convolutions


def test_fused_resampling_is_off_on_the_cpu_by_default():
    x = torch.zeros(1)
    assert not fused_resampling_active(x)
    with fused_resampling(True):
        assert fused_resampling_active(x)
        with fused_resampling(False):
            assert not fused_resampling_active(x)
    assert not fused_resampling_active(x)


@pytest.mark.parametrize("fused, reference", [
    (upscale2d_conv2d, lambda x, w: F.conv2d(upsample2x(x), w, padding=1)),
    (conv2d_downscale2d, lambda x, w: downsample2x(F.conv2d(x, w, padding=1))),
], ids=["upscale2d_conv2d", "conv2d_downscale2d"])
def test_fused_resampling_equals_the_two_ops_with_derivatives(fused, reference):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    y, y_ref = fused(x, w), reference(x, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    # first and second derivatives (a penalty-like |dy/dx|^2 differentiated w.r.t. x and w)
    grads = []
    for fn in (fused, reference):
        out = fn(x, w)
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), (x, w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    small_x = torch.randn(1, 2, 4, 4, dtype=F64, requires_grad=True)
    small_w = torch.randn(3, 2, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (small_x, small_w))
    assert torch.autograd.gradgradcheck(fused, (small_x, small_w))


def test_layer_forward_upsampled_equals_the_layer_on_the_upsampled_input():
    torch.manual_seed(0)
    layer = EqualizedConv2d(3, 5, 3).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(layer.forward_upsampled(x), layer(upsample2x(x)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="3x3"):
        EqualizedConv2d(3, 5, 1).forward_upsampled(x.float())


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_generator_with_fused_upsampling_equals_today_with_gradients(alpha):
    torch.manual_seed(0)
    G = Generator(max_resolution=32, latent_size=16, fmap_base=128, fmap_max=16).double()
    z = torch.randn(4, 16, dtype=F64)
    out = {}
    for on in (False, True):
        G.zero_grad(set_to_none=True)
        with fused_resampling(on):
            img = G(z, 32, alpha)
        img.pow(2).mean().backward()
        out[on] = (img.detach(), {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=1e-12)
    assert out[True][1].keys() == out[False][1].keys()
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
