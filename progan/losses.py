"""GAN losses as objects separate from the models (paper section 6 and the official loss.py).

Each loss takes the critic as a callable `D(images) -> scores`, so the same code runs on a bare
module, a DDP-wrapped one or a lambda that fixes the resolution and alpha. Reals and fakes go
through D in separate calls so the minibatch-stddev layer never mixes them.
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


class WGANGP:
    """Wasserstein loss with gradient penalty (Gulrajani et al.) and the paper's drift term
    epsilon * D(real)^2; the penalty is lambda * (|grad| - target)^2 / target^2."""

    def __init__(self, gp_lambda: float = 10.0, drift_epsilon: float = 0.001, gp_target: float = 1.0):
        self.gp_lambda, self.drift_epsilon, self.gp_target = gp_lambda, drift_epsilon, gp_target

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor,
                    mix: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """`mix`: the per-sample interpolation factors, U(0, 1) when not given."""
        real_scores = D(reals)
        fake_scores = D(fakes)
        if mix is None:
            mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=reals.dtype)
        _, grad_sq = _input_gradient_norm_sq(D, torch.lerp(reals, fakes.detach(), mix))
        penalty = (grad_sq.add(1e-12).sqrt() - self.gp_target).pow(2) / self.gp_target ** 2
        loss = (fake_scores - real_scores + self.gp_lambda * penalty
                + self.drift_epsilon * real_scores.pow(2)).mean()
        return loss, {"loss_d": loss.detach(), "grad_penalty": penalty.detach().mean(),
                      "score_real": real_scores.detach().mean(), "score_fake": fake_scores.detach().mean()}

    def generator_loss(self, D: Critic, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = -D(fakes).mean()
        return loss, {"loss_g": loss.detach()}


class LogisticR1:
    """Non-saturating logistic loss with the R1 penalty gamma/2 * |grad D(real)|^2 (Mescheder et al.)."""

    def __init__(self, r1_gamma: float = 10.0):
        self.r1_gamma = r1_gamma

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        real_scores, grad_sq = _input_gradient_norm_sq(D, reals)
        fake_scores = D(fakes)
        penalty = grad_sq * (self.r1_gamma / 2)
        loss = (F.softplus(fake_scores) + F.softplus(-real_scores) + penalty).mean()
        return loss, {"loss_d": loss.detach(), "grad_penalty": penalty.detach().mean(),
                      "score_real": real_scores.detach().mean(), "score_fake": fake_scores.detach().mean()}

    def generator_loss(self, D: Critic, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = F.softplus(-D(fakes)).mean()
        return loss, {"loss_g": loss.detach()}


class LeastSquares:
    """LSGAN (Mao et al.): D pushes reals to 1 and fakes to 0; G pushes fakes to 1."""

    def critic_loss(self, D: Critic, reals: torch.Tensor, fakes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        real_scores = D(reals)
        fake_scores = D(fakes)
        loss = 0.5 * ((real_scores - 1).pow(2) + fake_scores.pow(2)).mean()
        return loss, {"loss_d": loss.detach(), "grad_penalty": torch.zeros(()),
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
