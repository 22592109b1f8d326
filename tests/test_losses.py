import pytest
import torch
import torch.nn.functional as F

from progan.model.ema import ema_beta, make_ema, update_ema
from progan.model.losses import LeastSquares, LogisticR1, WGANGP, make_loss


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
    loss, stats = WGANGP(gp_lambda=10, drift_epsilon=0.001).critic_loss(D, reals, fakes, resolution_scale=1)
    norm = w.norm().item()
    assert stats["grad_penalty"].item() == pytest.approx((norm - 1) ** 2, rel=1e-4)
    real_s, fake_s = D(reals), D(fakes)
    expected = (fake_s - real_s + 10 * (norm - 1) ** 2 + 0.001 * real_s ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # the penalty is differentiable w.r.t. D's weights: d/dw of 10(|w|-1)^2 = 20(|w|-1) w/|w|
    D.zero_grad()
    WGANGP(gp_lambda=10, drift_epsilon=0.0).critic_loss(D, reals, fakes, resolution_scale=1)[0].backward()
    data_grad = (fakes - reals).mean(0)
    torch.testing.assert_close(D.w.grad, data_grad + 20 * (norm - 1) * w / norm, rtol=1e-4, atol=1e-4)


def test_unit_gradient_critic_has_zero_penalty():
    w = torch.randn(3, 4, 4)
    D = LinearCritic(w / w.norm())
    _, stats = WGANGP().critic_loss(D, torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4),
                                  resolution_scale=1)
    assert stats["grad_penalty"].item() == pytest.approx(0.0, abs=1e-6)


def test_r1_penalty_and_other_losses():
    w = torch.full((3, 2, 2), 0.5)
    D = LinearCritic(w)
    reals, fakes = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    _, stats = LogisticR1(r1_gamma=10).critic_loss(D, reals, fakes, resolution_scale=1)
    assert stats["grad_penalty"].item() == pytest.approx(5 * w.pow(2).sum().item())
    g_loss, _ = LogisticR1().generator_loss(D, fakes)
    assert g_loss.item() == pytest.approx(torch.nn.functional.softplus(-D(fakes)).mean().item())
    d_ls, _ = LeastSquares().critic_loss(D, reals, fakes, resolution_scale=1)
    assert d_ls.item() == pytest.approx((0.5 * ((D(reals) - 1) ** 2 + D(fakes) ** 2)).mean().item())
    assert isinstance(make_loss("least_squares"), LeastSquares)
    with pytest.raises(ValueError):
        make_loss("hinge")



class SmallCritic(torch.nn.Module):
    """A nonlinear critic at the current resolution: its input gradient differs per sample."""

    def __init__(self, resolution: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.dense = torch.nn.Linear(4 * resolution * resolution, 1)

    def forward(self, x):
        return self.dense(torch.tanh(self.conv(x)).flatten(1)).squeeze(1)


def official_full_resolution_loss(kind: str, D, reals, fakes, mix, k: int):
    """The official code's critic loss: reals and fakes nearest-upscaled k times to the final
    resolution, a critic that average-pools its input back down, the input gradient taken there."""
    def upscale(x):
        return F.interpolate(x, scale_factor=k, mode="nearest")

    def D_full(x):
        return D(F.avg_pool2d(x, k))
    real_scores, fake_scores = D_full(upscale(reals)), D_full(upscale(fakes))
    point = upscale(torch.lerp(reals, fakes, mix) if kind == "wgan_gp" else reals).requires_grad_(True)
    (grad,) = torch.autograd.grad(D_full(point).sum(), point, create_graph=True)
    norm = grad.flatten(1).norm(dim=1)
    if kind == "wgan_gp":
        penalty = (norm - 1) ** 2
        loss = fake_scores - real_scores + 10 * penalty + 0.001 * real_scores ** 2
    else:
        penalty = 5 * norm ** 2
        loss = F.softplus(fake_scores) + F.softplus(-real_scores) + penalty
    return loss.mean(), penalty.mean(), norm.mean()


@pytest.mark.parametrize("kind", ["wgan_gp", "logistic_r1"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_penalty_is_the_official_full_resolution_one(kind, k):
    """At 4x4 of a 4k x 4k network the penalty, the loss and the critic's gradient equal those of
    the official code's full-resolution critic input (float64); grad_norm is measured at the
    current resolution, k times the full-resolution norm."""
    torch.manual_seed(k)
    D = SmallCritic(4).double()
    reals, fakes = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    mix = torch.rand(6, 1, 1, 1, dtype=torch.float64)
    loss_fn = make_loss(kind, gp_lambda=10, drift_epsilon=0.001, gp_target=1.0, r1_gamma=10)
    extra = {"mix": mix} if kind == "wgan_gp" else {}
    loss, stats = loss_fn.critic_loss(D, reals, fakes, resolution_scale=k, **extra)
    ours = torch.autograd.grad(loss, list(D.parameters()))
    ref_loss, ref_penalty, ref_norm = official_full_resolution_loss(kind, D, reals, fakes, mix, k)
    theirs = torch.autograd.grad(ref_loss, list(D.parameters()))
    torch.testing.assert_close(stats["grad_penalty"], ref_penalty.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats["grad_norm"], k * ref_norm.detach(), rtol=1e-10, atol=1e-12)
    if k > 1:  # the scale matters: the penalty at the current resolution with target 1 differs
        assert not torch.allclose(loss_fn.critic_loss(D, reals, fakes, resolution_scale=1, **extra)[1]["grad_penalty"],
                                  ref_penalty, rtol=1e-3)


def test_resolution_scale_below_one_is_refused():
    D = LinearCritic(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="resolution_scale"):
        WGANGP().critic_loss(D, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), resolution_scale=0.5)


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
