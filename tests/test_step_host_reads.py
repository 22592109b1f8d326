"""train_step makes no host reads (issue 23): nothing in it turns a tensor into a Python value, so
on CUDA the step never waits for the device; the training loop converts the returned tensors at
its stats lines (one stacked .cpu())."""
from unittest import mock

import pytest
import torch

from progan.model.layers import fade_reals
from progan.model.losses import WGANGP
from progan.model.networks import Discriminator, Generator, set_trainable
from progan.training.training_step import make_optimizer, train_step


def tiny_setup(resolution: int, alpha: float, batch: int = 4, fade: bool = True):
    """One train_step as a callable; `fade`: fade_reals inside it (as the loop does) or reals as given."""
    torch.manual_seed(0)
    G = Generator(max_resolution=resolution, latent_size=16, fmap_base=64, fmap_max=8)
    D = Discriminator(max_resolution=resolution, fmap_base=64, fmap_max=8)
    for net in (G, D):
        set_trainable(net, resolution, alpha < 1.0)
    opt_g, opt_d = (make_optimizer(m, 0.001, 0.0, 0.99, 1e-8) for m in (G, D))
    reals = torch.randn(batch, 3, resolution, resolution)
    return lambda precision="fp32": train_step(G, D, D, opt_g, opt_d, WGANGP(),
                                               fade_reals(reals, alpha) if fade else reals,
                                               resolution, alpha, 16, precision=precision)


def _refuse(name):
    def read(*args, **kwargs):
        raise AssertionError(f"host read in train_step: Tensor.{name}")
    return read


HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_train_step_makes_no_host_reads(precision, alpha):
    step = tiny_setup(16, alpha)
    step(precision)  # first step: Adam's state is created
    with mock.patch.multiple(torch.Tensor, **{name: _refuse(name) for name in HOST_READS}):
        stats = step(precision)
    assert all(torch.is_tensor(v) for k, v in stats.items() if k != "backward_seconds")
    assert isinstance(stats["backward_seconds"], float)  # host time, not a tensor read
    assert torch.isfinite(stats["loss_d"]) and torch.isfinite(stats["loss_g"])


def test_the_mock_does_catch_a_host_read():
    with mock.patch.multiple(torch.Tensor, **{name: _refuse(name) for name in HOST_READS}):
        with pytest.raises(AssertionError, match="Tensor.item"):
            torch.ones(()).item()
        with pytest.raises(AssertionError, match="__bool__"):
            bool(torch.ones(()))
