import math

import pytest
import torch

from purifytf.diffusion import NoiseSchedule


def test_linear_schedule_matches_closed_form():
    s = NoiseSchedule.linear()
    betas = [1e-4 + (2e-2 - 1e-4) * i / 999 for i in range(1000)]
    expected = math.prod(1 - b for b in betas[:100])
    assert s.num_steps == 1000
    assert s.alpha_bar(0).item() == 1.0
    assert s.alpha_bar(100).item() == pytest.approx(expected, rel=1e-6)
    assert s.alpha_bar(1).item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert torch.allclose(s.alphas_cumprod[99], torch.tensor(expected, dtype=torch.float64))


def test_custom_table_and_validation():
    s = NoiseSchedule([0.9, 0.5, 0.1])
    assert s.num_steps == 3
    assert s.alpha_bar(2).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule([0.5, 0.9])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule([1.5, 0.5])
    with pytest.raises(ValueError, match="timesteps"):
        s.alpha_bar(torch.tensor([4]))


def test_float_timesteps_interpolate_and_are_exact_on_integers():
    s = NoiseSchedule.linear()
    t = torch.tensor([10.0, 250.0, 999.0])
    assert torch.allclose(s.alpha_bar(t), s.alpha_bar(t.long()), rtol=1e-6)
    mid = s.alpha_bar(torch.tensor([10.5]))
    lo, hi = s.alpha_bar(10).item(), s.alpha_bar(11).item()
    assert mid.item() == pytest.approx(math.sqrt(lo * hi), rel=1e-6)  # log-linear
    t = torch.tensor([100.3], requires_grad=True)
    s.alpha_bar(t).sum().backward()
    assert t.grad.item() < 0  # more steps, less signal


def test_per_sample_and_per_pixel_timesteps_broadcast():
    s = NoiseSchedule.linear()
    x = torch.zeros(2, 3, 4, 4)
    per_sample = s.alpha_bar(torch.tensor([0, 500]), like=x)
    assert per_sample.shape == (2, 1, 1, 1)
    t_map = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    t_map[:, :, :2] = 300
    per_pixel = s.alpha_bar(t_map, like=x)
    assert per_pixel.shape == (2, 1, 4, 4)
    noise = torch.ones_like(x)
    xt = s.q_sample(x, t_map, noise)
    assert torch.allclose(xt[:, :, 2:], torch.zeros(()))  # t = 0 pixels stay clean
    assert torch.allclose(xt[:, :, :2], (1 - s.alpha_bar(300)).sqrt().expand(2, 3, 2, 4))


def test_q_sample_moments_match_schedule():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    xt = s.q_sample(x0, 400, torch.randn(x0.shape, generator=g))
    abar = s.alpha_bar(400).item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_q_jump_composes_to_q_sample():
    """Diffusing 0 -> s -> t with two draws has the moments of 0 -> t with one."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), -0.3)
    xs = s.q_sample(x0, 100, torch.randn(x0.shape, generator=g))
    xt = s.q_jump(xs, 100, 300, torch.randn(x0.shape, generator=g))
    abar = s.alpha_bar(300).item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * -0.3, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)
    assert torch.equal(s.q_jump(xs, 100, 100, torch.randn(x0.shape)), xs)  # zero steps: identity


def test_tweedie_and_score_conversions_invert():
    s = NoiseSchedule.linear()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([50, 700])
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.predict_x0(xt, t, eps, clip=False), x0, atol=1e-4)
    score = s.eps_to_score(eps, t)
    assert torch.allclose(score, -eps / (1 - s.alpha_bar(t, like=eps)).sqrt())
    assert torch.allclose(s.score_to_eps(score, t), eps, atol=1e-6)
    assert s.predict_x0(xt, t, eps * 50).abs().max() <= 1  # clamped
