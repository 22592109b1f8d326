"""The aten op count of one train_step at 256x256 (issue 23), counted on the CPU with tiny widths:
at most what it was before the issue's rewrites."""
import collections

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from test_step_host_reads import tiny_setup


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
