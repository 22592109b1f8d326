"""A 2-D convolution whose first and second derivatives are ordinary convolution kernels.

aten's convolution double backward (what the gradient penalty's backward runs through) computes
one of its terms as a convolution whose "filter" is a feature map (the output gradient, as large
as the activation): a shape cuDNN handles badly. Here the convolution and its weight gradient
are autograd Functions whose backward passes are again written with these Functions, so every
derivative, to any order, is a forward convolution, a transposed convolution (the data
gradient) or a weight-gradient call (`aten.convolution_backward` with only the weight output),
each with a weight-shaped filter. The idea and the structure follow StyleGAN2-ADA's
`torch_utils/ops/conv2d_gradfix.py`; this one covers only what EqualizedConv2d needs: stride 1,
dilation 1, groups 1, symmetric padding.

Off by default: `model.conv_gradfix=true` turns it on for CUDA inputs (`use_on_cuda`), until the
GPU check has measured it on a GPU (it has not run on one yet); the CPU keeps F.conv2d.
`forced(True)` turns it on for any device (tests), `forced(False)` off.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

_forced: bool | None = None  # None: on for CUDA tensors when use_on_cuda(True), off elsewhere
_on_cuda = False


def use_on_cuda(enabled: bool) -> None:
    """This process's default for CUDA inputs (the training worker sets model.conv_gradfix)."""
    global _on_cuda
    _on_cuda = enabled


@contextlib.contextmanager
def forced(enabled: bool | None) -> Iterator[None]:
    """Within the block the gradfix is on (True) or off (False) on every device; None: the default."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


def active(x: torch.Tensor) -> bool:
    return (x.is_cuda and _on_cuda) if _forced is None else _forced


def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """F.conv2d(x, weight, None, padding=padding) (stride 1, groups 1) with gradfix derivatives.
    Under autocast the inputs are cast as autocast would cast them, and the Function runs with
    autocast off, so its backward sees gradients of the dtype it computed in."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device_type=device, enabled=False):
            return _function(False, padding).apply(x.to(dtype), weight.to(dtype))
    return _function(False, padding).apply(x, weight)


_FUNCTIONS: dict[tuple[bool, int], type] = {}


def _function(transpose: bool, padding: int) -> type:
    """The Function for conv2d (transpose=False) or conv_transpose2d (True) at this padding; with
    stride 1 and no output padding each one's data gradient is the other."""
    key = (transpose, padding)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if transpose:
            return F.conv_transpose2d(x, w, None, stride=1, padding=padding)
        return F.conv2d(x, w, None, stride=1, padding=padding)

    class Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            return run(x, w)

        @staticmethod
        def backward(ctx, grad_y: torch.Tensor):
            x, w = ctx.saved_tensors
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = _function(not transpose, padding).apply(grad_y, w)
            if ctx.needs_input_grad[1]:
                grad_w = GradWeight.apply(grad_y, x, tuple(w.shape))
            return grad_x, grad_w

    class GradWeight(torch.autograd.Function):
        """d <y, grad_y> / d w for y = run(x, w): bilinear in (grad_y, x)."""

        @staticmethod
        def forward(ctx, grad_y: torch.Tensor, x: torch.Tensor, w_shape: tuple) -> torch.Tensor:
            ctx.save_for_backward(grad_y, x)
            # only the weight's shape is read (an uninitialised stand-in, as SG2-ADA passes one)
            w_stand_in = torch.empty(w_shape, dtype=x.dtype, device=x.device)
            return torch.ops.aten.convolution_backward(
                grad_y, x, w_stand_in, None, [1, 1], [padding, padding], [1, 1], transpose, [0, 0], 1,
                [False, True, False])[1]

        @staticmethod
        def backward(ctx, grad2_w: torch.Tensor):
            grad_y, x = ctx.saved_tensors
            grad2_grad_y = grad2_x = None
            if ctx.needs_input_grad[0]:
                grad2_grad_y = Conv.apply(x, grad2_w)
            if ctx.needs_input_grad[1]:
                grad2_x = _function(not transpose, padding).apply(grad_y, grad2_w)
            return grad2_grad_y, grad2_x, None

    Conv.__name__ = Conv.__qualname__ = f"Conv{'Transpose' if transpose else ''}2dGradfix_p{padding}"
    _FUNCTIONS[key] = Conv
    return Conv
