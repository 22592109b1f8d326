"""The aten op count of one train_step at 256x256 (issue 23), counted on the CPU with tiny widths:
at most what it was before the issue's rewrites."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


# aten ops in one train_step at 256x256 (tiny widths, batch 4, CPU, reals not faded) at git f2569b9,
# before these issue-23 rewrites: fp32 2271 (2396 fading), bf16 2748 (2901 fading).
# After reals and fakes share one critic call and the bf16 bias stays bf16: 1946 / 2051 / 2313 / 2441.
OPS_BEFORE = {("fp32", 1.0): 2271, ("fp32", 0.5): 2396, ("bf16", 1.0): 2748, ("bf16", 0.5): 2901}


@pytest.mark.parametrize("precision, alpha", sorted(OPS_BEFORE))
def test_op_count_of_one_step_at_256_is_at_most_before(precision, alpha):
    step = tiny_setup(256, alpha, fade=False)
    step(precision)
    with OpCount() as counter:
        step(precision)
    total = sum(counter.ops.values())
    print(f"{precision} alpha={alpha}: {total} aten ops (before: {OPS_BEFORE[precision, alpha]})")
    assert total <= OPS_BEFORE[precision, alpha], counter.ops.most_common(20)
