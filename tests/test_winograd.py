"""Winograd F(2x2, 3x3): the same convolution as F.conv2d, through forward, backward and the
gradient penalty's double backward, and used exactly where it is meant to be."""
import pytest
import torch
import torch.nn.functional as F

from progan import layers
from progan.layers import EqualizedConv2d, use_cpu_winograd
from progan.losses import WGANGP
from progan.networks import Discriminator
from progan.winograd import winograd_conv3x3, winograd_pays


def _close(a, b, rel=1e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item() / scale


@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (3, 7, 8, 6), (1, 4, 2, 10)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_conv2d_forward(shape, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w = torch.randn(6, shape[1], 3, 3)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    _close(winograd_conv3x3(x, w, scale=0.3), F.conv2d(x, w * 0.3, padding=1))


def test_equals_conv2d_in_backward_and_double_backward():
    """The penalty's path: input gradient with create_graph, then gradients of its norm with
    respect to input and weight."""
    torch.manual_seed(1)
    x0 = torch.randn(4, 8, 6, 6)
    w0 = torch.randn(5, 8, 3, 3)
    probe = torch.randn(4, 5, 6, 6)
    results = []
    for conv in (lambda x, w: winograd_conv3x3(x, w, 0.5), lambda x, w: F.conv2d(x, w * 0.5, padding=1)):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = conv(x, w)
        out = (torch.tanh(y) * probe).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = gx.pow(2).sum()
        results.append((y, gx) + torch.autograd.grad(penalty, (x, w)))
    for got, want in zip(*results):
        _close(got, want)


def test_used_only_where_it_pays():
    wide = torch.empty(512, 512, 3, 3)
    assert winograd_pays(torch.empty(32, 512, 8, 8), wide, padding=1)
    assert winograd_pays(torch.empty(2, 512, 16, 16), wide, padding=1)
    assert not winograd_pays(torch.empty(4, 512, 4, 4), wide, padding=1)        # 16 tiles: too few
    assert winograd_pays(torch.empty(16, 256, 8, 8), torch.empty(256, 256, 3, 3), padding=1)
    assert not winograd_pays(torch.empty(32, 128, 8, 8), torch.empty(128, 128, 3, 3), padding=1)  # narrow
    assert not winograd_pays(torch.empty(32, 512, 8, 8), torch.empty(512, 512, 1, 1), padding=0)  # 1x1
    assert not winograd_pays(torch.empty(32, 512, 4, 4), torch.empty(512, 512, 4, 4), padding=0)  # 4x4 dense
    assert not winograd_pays(torch.empty(32, 512, 7, 7), wide, padding=1)        # odd map


def test_layer_and_network_agree_with_the_direct_path():
    """A paper-width critic at 8x8 runs its 3x3 convolutions by Winograd (batch 32) and gives
    the direct kernels' scores; turning the switch off really changes the path taken."""
    torch.manual_seed(2)
    layer = EqualizedConv2d(512, 512, 3).to(memory_format=torch.channels_last)
    x = torch.randn(32, 512, 8, 8).contiguous(memory_format=torch.channels_last)
    fast = layer(x)
    use_cpu_winograd(layer, False)
    direct = layer(x)
    _close(fast, direct)
    assert not torch.equal(fast, direct)  # different arithmetic, so not bit-equal

    D = Discriminator().to(memory_format=torch.channels_last)
    images = torch.randn(32, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        winograd_scores = D(images, 8, 1.0)
        use_cpu_winograd(D, False)
        direct_scores = D(images, 8, 1.0)
    _close(winograd_scores, direct_scores, rel=1e-4)


def test_critic_gradients_with_the_penalty_match_the_direct_path(monkeypatch):
    """The WGAN-GP critic loss (penalty = double backward) through a paper-width critic at 8x8:
    the same loss and weight gradients with Winograd as with the direct kernels. In float64, so
    that what is compared is the maths and not float32 rounding, which the penalty amplifies in
    small gradients (about 1e-3 relative there in float32, either way round)."""
    calls = []
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(1) or winograd_conv3x3(*a))
    torch.manual_seed(3)
    D = Discriminator().to(torch.float64, memory_format=torch.channels_last)
    reals, fakes = (torch.randn(8, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
                    for _ in range(2))
    mix = torch.rand(8, 1, 1, 1, dtype=torch.float64)
    results = []
    for enabled in (True, False):
        use_cpu_winograd(D, enabled)
        D.zero_grad(set_to_none=True)
        loss, _ = WGANGP().critic_loss(lambda x: D(x, 8, 1.0), reals, fakes, mix=mix)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}))
    assert len(calls) == 3 * 2  # the two 8x8 convolutions in each of the critic's three calls
    (loss_w, grads_w), (loss_d, grads_d) = results
    assert torch.allclose(loss_w, loss_d, rtol=1e-10)
    assert grads_w.keys() == grads_d.keys() and len(grads_w) >= 6
    for name in grads_w:
        _close(grads_w[name], grads_d[name], rel=1e-9)
