"""One training step: a critic step (with its penalty) then a generator step, as the official
code alternates them (D_repeats=1). Knows nothing of ranks: the loop hands in DDP-wrapped or
bare modules alike. The benchmark times exactly this function.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn



@contextlib.contextmanager
def frozen(module: nn.Module):
    """Stops gradients into `module`'s parameters for a while (D during the generator step)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def resolution_scale_for(D_module: nn.Module, resolution: int) -> float:
    """k = max_resolution / resolution: how much the official code upscales the images the
    critic sees, which sets the scale of the input-gradient penalties (progan/model/losses.py)."""
    return D_module.max_resolution / resolution


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}, expected one of {', '.join(PRECISIONS)}")


def in_precision(network, resolution: int, alpha: float, precision: str):
    """`network(x, resolution, alpha)` as a one-argument callable. fp32: the plain call. bf16: the
    forward pass under autocast, its output cast back to fp32, so that everything outside the
    networks (the losses, the penalty's mix of reals and fakes, the penalty's
    `autograd.grad(create_graph=True)`, the stats) runs in fp32 outside autocast, as torch's AMP
    notes ask for gradient penalties; the backward ops still run in the dtypes of their forward
    ops. Parameters stay fp32 (autocast casts them per op), and so do the optimisers and the EMA."""
    if precision == "fp32":
        return lambda x: network(x, resolution, alpha)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = network(x, resolution, alpha)
        return out.float()
    return forward


def critic_step(G, D, opt_d: torch.optim.Optimizer, loss, reals: torch.Tensor, resolution: int,
                alpha: float, latent_size: int, resolution_scale: float, loss_weight: float = 1.0,
                precision: str = "fp32", joint: bool = False) -> dict:
    """`loss_weight` multiplies the loss before backward (not the returned stats): a rank's
    share of an uneven split of the global minibatch (progan.model.schedule.share_weights).
    `precision`: fp32 or bf16 (in_precision). `joint`: reals and fakes through D in one call
    (only where that gives the same scores: Discriminator.joins)."""
    z = torch.randn(reals.shape[0], latent_size, device=reals.device)
    with torch.no_grad():
        fakes = in_precision(G, resolution, alpha, precision)(z)
    opt_d.zero_grad(set_to_none=True)
    d_loss, stats = loss.critic_loss(in_precision(D, resolution, alpha, precision), reals, fakes,
                                     resolution_scale=resolution_scale, joint=joint)
    started = time.perf_counter()
    (d_loss * loss_weight if loss_weight != 1.0 else d_loss).backward()
    stats["backward_seconds"] = time.perf_counter() - started  # host time, with DDP's all-reduces
    opt_d.step()
    return stats


def generator_step(G, D_module: nn.Module, opt_g: torch.optim.Optimizer, loss, batch: int,
                   resolution: int, alpha: float, latent_size: int, device, loss_weight: float = 1.0,
                   precision: str = "fp32") -> dict:
    """D_module is the bare critic (not its DDP wrapper): its parameters get no gradient here,
    so its reducer must not expect any. `loss_weight` and `precision` as in critic_step."""
    z = torch.randn(batch, latent_size, device=device)
    opt_g.zero_grad(set_to_none=True)
    with frozen(D_module):
        g_loss, stats = loss.generator_loss(in_precision(D_module, resolution, alpha, precision),
                                            in_precision(G, resolution, alpha, precision)(z))
        started = time.perf_counter()
        (g_loss * loss_weight if loss_weight != 1.0 else g_loss).backward()
        stats["backward_seconds"] = time.perf_counter() - started
    opt_g.step()
    return stats


def train_step(G, D, D_module: nn.Module, opt_g, opt_d, loss, reals: torch.Tensor, resolution: int,
               alpha: float, latent_size: int, loss_weight: float = 1.0, precision: str = "fp32") -> dict:
    """Critic step on `reals` (already faded, fp32), then a generator step on as many latents. The
    penalty's scale comes from D_module.max_resolution; `loss_weight` and `precision` (fp32 |
    bf16) as in critic_step. The returned stats are fp32 either way. Reals and fakes go through
    the critic in one call where D_module.joins says that gives the same scores (batch a multiple
    of the minibatch-stddev group)."""
    check_precision(precision)
    joins = getattr(D_module, "joins", None)
    stats = critic_step(G, D, opt_d, loss, reals, resolution, alpha, latent_size,
                        resolution_scale_for(D_module, resolution), loss_weight, precision,
                        joint=bool(joins is not None and joins(reals.shape[0])))
    g_stats = generator_step(G, D_module, opt_g, loss, reals.shape[0], resolution, alpha, latent_size,
                             reals.device, loss_weight, precision)
    stats["backward_seconds"] += g_stats.pop("backward_seconds")
    stats.update(g_stats)
    return stats


def memory_format(channels_last: bool) -> torch.memory_format:
    """For `module.to(memory_format=...)`: NHWC conv weights make the activations NHWC too, which
    oneDNN's CPU convolutions run faster (bench/train_step.py, --nchw for the other)."""
    return torch.channels_last if channels_last else torch.preserve_format


def make_optimizer(module: nn.Module, lr: float, beta1: float, beta2: float, eps: float):
    """Adam over every parameter; frozen ones (other resolutions) get no grad and are skipped.
    The fused kernel (one pass over all parameters instead of about ten element-wise ops per
    parameter tensor) where torch has it for the parameters' device and dtype: the same update."""
    params = list(module.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in
                                 (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                                 for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(float(beta1), float(beta2)), eps=eps,
                            fused=fused or None)
