import pytest
import torch

from progan.ema import ema_beta, make_ema, update_ema
from progan.losses import LeastSquares, LogisticR1, WGANGP, make_loss


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere, so the penalty is known in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_gradient_penalty_on_a_known_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    D = LinearCritic(w)
    reals, fakes = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    loss, stats = WGANGP(gp_lambda=10, drift_epsilon=0.001).critic_loss(D, reals, fakes)
    norm = w.norm().item()
    assert stats["grad_penalty"].item() == pytest.approx((norm - 1) ** 2, rel=1e-4)
    real_s, fake_s = D(reals), D(fakes)
    expected = (fake_s - real_s + 10 * (norm - 1) ** 2 + 0.001 * real_s ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # the penalty is differentiable w.r.t. D's weights: d/dw of 10(|w|-1)^2 = 20(|w|-1) w/|w|
    D.zero_grad()
    WGANGP(gp_lambda=10, drift_epsilon=0.0).critic_loss(D, reals, fakes)[0].backward()
    data_grad = (fakes - reals).mean(0)
    torch.testing.assert_close(D.w.grad, data_grad + 20 * (norm - 1) * w / norm, rtol=1e-4, atol=1e-4)


def test_unit_gradient_critic_has_zero_penalty():
    w = torch.randn(3, 4, 4)
    D = LinearCritic(w / w.norm())
    _, stats = WGANGP().critic_loss(D, torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4))
    assert stats["grad_penalty"].item() == pytest.approx(0.0, abs=1e-6)


def test_r1_penalty_and_other_losses():
    w = torch.full((3, 2, 2), 0.5)
    D = LinearCritic(w)
    reals, fakes = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    _, stats = LogisticR1(r1_gamma=10).critic_loss(D, reals, fakes)
    assert stats["grad_penalty"].item() == pytest.approx(5 * w.pow(2).sum().item())
    g_loss, _ = LogisticR1().generator_loss(D, fakes)
    assert g_loss.item() == pytest.approx(torch.nn.functional.softplus(-D(fakes)).mean().item())
    d_ls, _ = LeastSquares().critic_loss(D, reals, fakes)
    assert d_ls.item() == pytest.approx((0.5 * ((D(reals) - 1) ** 2 + D(fakes) ** 2)).mean().item())
    assert isinstance(make_loss("least_squares"), LeastSquares)
    with pytest.raises(ValueError):
        make_loss("hinge")


def test_ema_follows_the_generator():
    g = torch.nn.Linear(3, 3)
    ema = make_ema(g)
    assert not any(p.requires_grad for p in ema.parameters())
    start = ema.weight.clone()
    with torch.no_grad():
        g.weight.add_(1.0)
    update_ema(ema, g, beta=0.999)
    torch.testing.assert_close(ema.weight, start + 0.001)
    assert ema_beta(32) == 0.999
    # a half-life of 1 kimg at batch 32: after 1000 images the old weights count half
    assert ema_beta(32, half_life_kimg=1.0) ** (1000 / 32) == pytest.approx(0.5)
