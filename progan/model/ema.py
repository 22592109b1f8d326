"""Exponential moving average of the generator's weights (the official G_smoothing)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(generator: nn.Module) -> nn.Module:
    ema = copy.deepcopy(generator).eval()
    ema.requires_grad_(False)
    return ema


def ema_beta(batch: int, beta: float = 0.999, half_life_kimg: float = 0.0) -> float:
    """The per-step decay: the paper's fixed beta, or one from a half-life in images, so the
    average covers the same number of images whatever the minibatch (for short runs)."""
    if half_life_kimg > 0:
        return 0.5 ** (batch / (half_life_kimg * 1000.0))
    return beta


@torch.no_grad()
def update_ema(ema: nn.Module, generator: nn.Module, beta: float) -> None:
    """ema = beta * ema + (1 - beta) * generator: one multi-tensor lerp over all parameters
    (one launch per device and dtype on CUDA instead of one per tensor; the same values)."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in generator.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the generator {len(params)}")
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), generator.buffers()):
        b_ema.copy_(b)
