import pytest
import torch

from purifytf.diffusion import NoiseSchedule, OracleBackbone, ddim_sample, ddim_step, timestep_grid


def test_timestep_grid_per_sample():
    grid = timestep_grid(torch.tensor([100, 7]), steps=10)
    assert grid.shape == (11, 2)
    assert grid[0].tolist() == [100, 7] and grid[-1].tolist() == [0, 0]
    assert torch.all(grid[:-1] >= grid[1:])
    assert grid[:, 0].tolist() == list(range(100, -1, -10))
    mid = timestep_grid(torch.tensor([200]), steps=4, t_end=100)
    assert mid[:, 0].tolist() == [200, 175, 150, 125, 100]
    with pytest.raises(ValueError):
        timestep_grid(torch.tensor([10]), steps=0)


def test_timestep_grid_straight_through():
    t = torch.tensor([99.6], requires_grad=True)
    grid = timestep_grid(t, steps=4)
    assert grid[:, 0].tolist() == [100.0, 75.0, 50.0, 25.0, 0.0]  # forward: ceil of the linspace
    grid.sum().backward()
    assert t.grad.item() == pytest.approx(1 + 0.75 + 0.5 + 0.25)  # backward: the linspace


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_is_the_posterior(clip):
    """eta = 1 samples q(x_tau | x_t, x0_hat), written here from the DDPM formulas (guided-diffusion's mean
    from x_t and the clamped x0_hat, where clamping applies)."""
    s = NoiseSchedule.linear()
    x_t = torch.randn(3, 1, 4, 4)
    eps = torch.randn_like(x_t) * 0.1
    t, tau = torch.tensor([300, 300, 41]), torch.tensor([299, 250, 0])
    a_t, a_tau = s.alpha_bar(t, like=x_t), s.alpha_bar(tau, like=x_t)
    x0 = s.predict_x0(x_t, t, eps, clip=clip)
    assert not clip or (s.predict_x0(x_t, t, eps, clip=False) != x0).float().mean() > 0.2  # clamping is active
    alpha = a_t / a_tau
    mean = (a_tau.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_tau) / (1 - a_t)) * x_t
    var = (1 - alpha) * (1 - a_tau) / (1 - a_t)
    z = torch.randn_like(x_t)
    got = ddim_step(s, x_t, eps, t, tau, eta=1.0, noise=z, clip=clip)
    assert torch.allclose(got, mean + var.sqrt() * z, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(s, x_t, eps, t, tau, eta=1.0)


def test_ddim_step_keeps_the_predicted_noise():
    s = NoiseSchedule.linear()
    x0, eps = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    t, tau = torch.tensor([500, 500]), torch.tensor([100, 0])
    x_tau = ddim_step(s, s.q_sample(x0, t, eps), eps, t, tau)
    assert torch.allclose(x_tau, s.q_sample(x0, tau, eps), atol=1e-5)


def test_oracle_posterior_mean_brute_force(references):
    """E[x0|x_t] against a float64 sum over the reference set."""
    oracle = OracleBackbone(references)
    s = oracle.schedule
    t = torch.tensor([50, 300, 800])
    x_t = torch.randn(3, 1, 8, 8)
    got = oracle.posterior_mean(x_t, t)
    refs = references.double() * 2 - 1
    for b in range(3):
        abar = s.alpha_bar(t[b]).double()
        logp = torch.stack([-(x_t[b].double() - abar.sqrt() * r).square().sum() / (2 * (1 - abar)) for r in refs])
        want = (logp.softmax(0)[:, None, None, None] * refs).sum(0)
        assert torch.allclose(got[b].double(), want, atol=1e-4)


def test_one_ddim_step_equals_tweedie(references):
    oracle = OracleBackbone(references)
    s = oracle.schedule
    x_t = s.q_sample(references * 2 - 1, 300, torch.randn_like(references))
    t = torch.full((4,), 300)
    out = ddim_sample(s, oracle, x_t, timestep_grid(t, steps=1))
    assert torch.allclose(out, oracle.posterior_mean(x_t, t).clamp(-1, 1), atol=1e-5)


def test_oracle_learned_sigma_channels_are_dropped(references):
    class TwoHead(OracleBackbone):
        def _predict(self, x_t, t):
            eps = super()._predict(x_t, t)
            return torch.cat([eps, torch.full_like(eps, 7.0)], 1)

    oracle = TwoHead(references)
    x = torch.randn(2, 1, 8, 8)
    out = oracle(x, torch.tensor([10, 10]))
    assert out.shape == x.shape and not torch.any(out == 7.0)
