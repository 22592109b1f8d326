"""The GPU step's rewrites, checked on the CPU: the multi-tensor EMA and the gradfix convolution
(progan/model/conv2d_gradfix.py), forced on, against today's per-tensor lerp and F.conv2d."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from progan.model import conv2d_gradfix
from progan.model.ema import make_ema, update_ema
from progan.model.layers import EqualizedConv2d
from progan.model.losses import WGANGP
from progan.model.networks import Discriminator, Generator

BATCH = 6  # not a channel count of the small critic below, so a filter with it is a feature map


# ---------------------------------------------------------------- EMA


@torch.no_grad()
def reference_update_ema(ema, generator, beta):
    """The per-tensor EMA update that stood in progan/model/ema.py before the multi-tensor one."""
    for p_ema, p in zip(ema.parameters(), generator.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), generator.buffers()):
        b_ema.copy_(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_ema_equals_the_per_tensor_lerp_bitwise(dtype):
    torch.manual_seed(0)
    G = Generator(max_resolution=8, latent_size=32, fmap_base=128, fmap_max=32).to(dtype)
    ema, reference = make_ema(G), make_ema(G)
    for step in range(3):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ema, G, beta=0.999 - 0.1 * step)
        reference_update_ema(reference, G, beta=0.999 - 0.1 * step)
    for (name, a), b in zip(ema.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not any(p.requires_grad for p in ema.parameters())


# ---------------------------------------------------------------- gradfix convolution


def test_gradfix_is_off_on_the_cpu_by_default():
    x = torch.randn(1, 1, 2, 2)
    assert not conv2d_gradfix.active(x)
    with conv2d_gradfix.forced(True):
        assert conv2d_gradfix.active(x)
        with conv2d_gradfix.forced(False):
            assert not conv2d_gradfix.active(x)
        assert conv2d_gradfix.active(x)
    assert not conv2d_gradfix.active(x)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0), (3, 0)])
def test_gradfix_gradcheck_and_gradgradcheck(transpose, kernel, padding):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    shape = (3, 4, kernel, kernel) if transpose else (4, 3, kernel, kernel)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fn = conv2d_gradfix._function(transpose, padding).apply
    reference = F.conv_transpose2d if transpose else F.conv2d
    torch.testing.assert_close(fn(x, w), reference(x, w, None, 1, padding), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_gradfix_layer_equals_f_conv2d_with_its_second_derivative():
    torch.manual_seed(0)
    layer = EqualizedConv2d(3, 5, 3).double()
    x = torch.randn(BATCH, 3, 6, 6, dtype=torch.float64)

    def penalty_grads(on: bool):
        with conv2d_gradfix.forced(on):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (g,) = torch.autograd.grad(y.pow(2).sum(), xi, create_graph=True)
            return y, torch.autograd.grad(g.pow(2).sum(), list(layer.parameters()))

    y_on, g_on = penalty_grads(True)
    y_off, g_off = penalty_grads(False)
    torch.testing.assert_close(y_on, y_off)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b)


def small_critic_batch():
    torch.manual_seed(0)
    D = Discriminator(max_resolution=16, fmap_base=128, fmap_max=32).double()
    reals = torch.randn(BATCH, 3, 16, 16, dtype=torch.float64)
    fakes = torch.randn(BATCH, 3, 16, 16, dtype=torch.float64)
    mix = torch.rand(BATCH, 1, 1, 1, dtype=torch.float64)
    return D, reals, fakes, mix


def critic_loss(D, reals, fakes, mix, alpha=1.0):
    return WGANGP().critic_loss(lambda x: D(x, 16, alpha), reals, fakes, resolution_scale=2, mix=mix)[0]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_critic_loss_gradients_equal_with_and_without_gradfix(alpha):
    D, reals, fakes, mix = small_critic_batch()
    grads = {}
    for on in (False, True):
        with conv2d_gradfix.forced(on):
            D.zero_grad(set_to_none=True)
            loss = critic_loss(D, reals, fakes, mix, alpha)
            loss.backward()
            grads[on] = (loss.detach(), {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys() and len(grads[True][1]) > 0
    for name in grads[False][1]:
        torch.testing.assert_close(grads[True][1][name], grads[False][1][name], msg=name)


class ConvolutionFilters(TorchDispatchMode):
    """Records the filter (weight argument) shape of every aten convolution and convolution_backward,
    with the spatial size of the activation it runs over."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.calls.append(("convolution", tuple(args[0].shape), tuple(args[1].shape)))
        elif func is torch.ops.aten.convolution_backward.default:
            self.calls.append(("convolution_backward", tuple(args[1].shape), tuple(args[2].shape)))
        return func(*args, **(kwargs or {}))


def feature_map_filters(calls, batch):
    """Calls whose filter is a feature map: it has a batch-sized axis, or it spans the activation's
    spatial size beyond 3x3 (the critic's kernels are 1x1 and 3x3; its 4x4 head is a GEMM)."""
    return [c for c in calls
            if batch in c[2][:2] or (max(c[2][2:]) > 3 and tuple(c[2][2:]) == tuple(c[1][2:]))]


@pytest.mark.parametrize("on", [True, False])
def test_penalty_double_backward_has_no_feature_map_filter_with_gradfix(on):
    D, reals, fakes, mix = small_critic_batch()
    with conv2d_gradfix.forced(on):
        with ConvolutionFilters() as forward_trace:
            loss = critic_loss(D, reals, fakes, mix)
        with ConvolutionFilters() as backward_trace:
            loss.backward()
    assert forward_trace.calls and backward_trace.calls
    bad = feature_map_filters(forward_trace.calls + backward_trace.calls, BATCH)
    if on:
        assert bad == []
    else:  # aten's double backward does convolve with feature maps: the check can fail
        assert bad and all(c[0] == "convolution" for c in bad)


def test_gradfix_under_cpu_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = EqualizedConv2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    outputs = {}
    for on in (True, False):
        with conv2d_gradfix.forced(on), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        layer.zero_grad(set_to_none=True)
        (g,) = torch.autograd.grad(y.float().pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        outputs[on] = (y.dtype, g.dtype, layer.weight.grad.dtype, y.detach().float(), layer.weight.grad.clone())
    assert outputs[True][:3] == outputs[False][:3]
    assert outputs[True][2] == torch.float32
    torch.testing.assert_close(outputs[True][3], outputs[False][3], rtol=0, atol=0)
    torch.testing.assert_close(outputs[True][4], outputs[False][4], rtol=5e-2, atol=5e-2)
