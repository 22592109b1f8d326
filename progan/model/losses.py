"""GAN losses as objects separate from the models (paper section 6 and the official loss.py).

Each loss takes the critic as a callable `D(images) -> scores`, so the same code runs on a bare
module, a DDP-wrapped one or a lambda that fixes the resolution and alpha. Reals and fakes go
through D in separate calls so the minibatch-stddev layer never mixes them, or, with
`joint=True` (the caller's promise that it changes nothing: Discriminator.joins), in one call on
both concatenated, which gives the same scores.

Penalties are on the official scale. The official critic always receives full-resolution
images (reals and G's output nearest-upscaled to the final resolution, average-pooled back down
inside D), so its input gradient is taken w.r.t. the full-resolution image. Upscaling by k and
average-pooling by k is the identity, and the pooling spreads each gradient value over k*k
pixels at 1/k^2 each: |grad wrt full-res| = |grad wrt current-res| / k, with
k = max_resolution / resolution (`resolution_scale`). The penalties here divide the gradient
at the current resolution by k instead of upscaling anything; the drift term is on D's output,
which is the same either way.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Critic = Callable[[torch.Tensor], torch.Tensor]


def _input_gradient_norm_sq(D: Critic, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D(images) and the squared L2 norm of d sum(D) / d images per sample, kept differentiable."""
    images = images.detach().requires_grad_(True)
    scores = D(images)
    (grad,) = torch.autograd.grad(scores.sum(), images, create_graph=True)
    return scores, grad.pow(2).flatten(1).sum(1)


def _scores(D: Critic, reals: torch.Tensor, fakes: torch.Tensor, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """D(reals), D(fakes): two calls, or one on both concatenated when `joint`."""
    if not joint:
        return D(reals), D(fakes)
    real_scores, fake_scores = D(torch.cat([reals, fakes])).split([reals.shape[0], fakes.shape[0]])
    return real_scores, fake_scores


def _check_scale(resolution_scale: float) -> float:
    if not resolution_scale >= 1:
        raise ValueError(f"resolution_scale: got {resolution_scale!r}, expected max_resolution / resolution >= 1")
    return float(resolution_scale)


class WGANGP:
    """Wasserstein loss with gradient penalty (Gulrajani et al.) and the paper's drift term
    epsilon * D(real)^2; the penalty is lambda * (|grad| - target)^2 / target^2."""

    def __init__(self, gp_lambda: float = 10.0, drift_epsilon: float = 0.001, gp_target: float = 1.0):
        self.gp_lambda, self.drift_epsilon, self.gp_target = gp_lambda, drift_epsilon, gp_target

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor, *, resolution_scale: float,
                    mix: torch.Tensor | None = None, joint: bool = False) -> tuple[torch.Tensor, dict]:
        """`resolution_scale`: max_resolution / the images' resolution (module docstring);
        `mix`: the per-sample interpolation factors, U(0, 1) when not given; `joint`: reals and
        fakes in one call (module docstring); the penalty's interpolates are a call of their own."""
        k = _check_scale(resolution_scale)
        real_scores, fake_scores = _scores(D, reals, fakes, joint)
        if mix is None:
            mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=reals.dtype)
        _, grad_sq = _input_gradient_norm_sq(D, torch.lerp(reals, fakes.detach(), mix))
        grad_norm = grad_sq.add(1e-12).sqrt()  # at the current resolution; the official one is this / k
        penalty = (grad_norm / k - self.gp_target).pow(2) / self.gp_target ** 2
        loss = (fake_scores - real_scores + self.gp_lambda * penalty
                + self.drift_epsilon * real_scores.pow(2)).mean()
        return loss, {"loss_d": loss.detach(), "grad_penalty": penalty.detach().mean(),
                      "grad_norm": grad_norm.detach().mean(),
                      "score_real": real_scores.detach().mean(), "score_fake": fake_scores.detach().mean()}

    def generator_loss(self, D: Critic, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = -D(fakes).mean()
        return loss, {"loss_g": loss.detach()}


class LogisticR1:
    """Non-saturating logistic loss with the R1 penalty gamma/2 * |grad D(real)|^2 (Mescheder et al.),
    the gradient on the official full-resolution scale (module docstring: |grad|^2 / k^2)."""

    def __init__(self, r1_gamma: float = 10.0):
        self.r1_gamma = r1_gamma

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor, *,
                    resolution_scale: float, joint: bool = False) -> tuple[torch.Tensor, dict]:
        """`joint` is accepted and unused: the reals' call is the penalty's (their input gradient)."""
        k = _check_scale(resolution_scale)
        real_scores, grad_sq = _input_gradient_norm_sq(D, reals)
        fake_scores = D(fakes)
        penalty = grad_sq * (self.r1_gamma / 2 / k ** 2)
        loss = (F.softplus(fake_scores) + F.softplus(-real_scores) + penalty).mean()
        return loss, {"loss_d": loss.detach(), "grad_penalty": penalty.detach().mean(),
                      "grad_norm": grad_sq.detach().sqrt().mean(),
                      "score_real": real_scores.detach().mean(), "score_fake": fake_scores.detach().mean()}

    def generator_loss(self, D: Critic, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = F.softplus(-D(fakes)).mean()
        return loss, {"loss_g": loss.detach()}


class LeastSquares:
    """LSGAN (Mao et al.): D pushes reals to 1 and fakes to 0; G pushes fakes to 1."""

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor, *,
                    resolution_scale: float, joint: bool = False) -> tuple[torch.Tensor, dict]:
        """No penalty, so no input gradient: `resolution_scale` is accepted and unused, and
        grad_penalty and grad_norm are reported as 0 (not computed); `joint` as in WGANGP."""
        real_scores, fake_scores = _scores(D, reals, fakes, joint)
        loss = 0.5 * ((real_scores - 1).pow(2) + fake_scores.pow(2)).mean()
        zero = real_scores.new_zeros(())
        return loss, {"loss_d": loss.detach(), "grad_penalty": zero, "grad_norm": zero,
                      "score_real": real_scores.detach().mean(), "score_fake": fake_scores.detach().mean()}

    def generator_loss(self, D: Critic, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = 0.5 * (D(fakes) - 1).pow(2).mean()
        return loss, {"loss_g": loss.detach()}


def make_loss(kind: str = "wgan_gp", gp_lambda: float = 10.0, drift_epsilon: float = 0.001,
              gp_target: float = 1.0, r1_gamma: float = 10.0):
    if kind == "wgan_gp":
        return WGANGP(gp_lambda, drift_epsilon, gp_target)
    if kind == "logistic_r1":
        return LogisticR1(r1_gamma)
    if kind == "least_squares":
        return LeastSquares()
    raise ValueError(f"loss kind {kind!r}: expected wgan_gp, logistic_r1 or least_squares")
