"""Attacks: an undefended classifier falls, budgets hold, names parse, views pick the right model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from purifytf import DiffPurify, OracleBackbone
from purifytf.attacks import (
    PRESETS,
    Attack,
    AttackSettings,
    apgd,
    eot_gradient,
    is_deterministic,
    parse_attacks,
    pgd_eot,
    uniform_surrogate,
)
from purifytf.defended import DefendedModel


def brightness_classifier(margin: float = 40.0) -> nn.Module:
    """Fixed linear 3-class model on 1x4x4 images: dark (mean < 0.5) -> 0, bright -> 1; class 2 never wins."""
    linear = nn.Linear(16, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([-1.0, 1.0, 0.0])[:, None].expand(3, 16) * margin / 16)
        linear.bias.copy_(torch.tensor([0.5, -0.5, -1.0]) * margin)
    return nn.Sequential(nn.Flatten(), linear)


def separable_data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, 4, 4) around brightness 0.35 (label 0) or 0.65 (label 1), with labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = (0.35 + 0.3 * labels.float())[:, None, None, None] + 0.03 * torch.randn(n, 1, 4, 4, generator=g)
    return images.clamp(0, 1), labels


def _accuracy(model: DefendedModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.predict(x) == y).float().mean().item()


@pytest.fixture
def undefended() -> DefendedModel:
    return DefendedModel(None, brightness_classifier(), normalize=None)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.2), ("L2", 1.0)])
def test_undefended_classifier_falls_to_pgd(undefended, norm, eps):
    x, y = separable_data()
    assert _accuracy(undefended, x, y) == 1.0
    torch.manual_seed(0)
    x_adv = pgd_eot(undefended, x, y, norm=norm, eps=eps, step=eps / 4, steps=10, eot=2)
    assert _accuracy(undefended, x_adv, y) == 0.0
    delta = (x_adv - x).flatten(1)
    assert (delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)).max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_small_budget_cannot_flip_a_wide_margin(undefended):
    x, y = separable_data()
    x_adv = Attack("pgd-eot-linf")(undefended, x, y, AttackSettings(eps=0.02, step=0.01, steps=5, eot=1))
    assert _accuracy(undefended, x_adv, y) == 1.0


@pytest.mark.parametrize("method", [*PRESETS["impure"], "autoattack-rand"])
def test_torchattacks_methods_run_within_budget(undefended, method):
    x, y = separable_data(4)
    settings = AttackSettings(eps=0.2, step=0.05, steps=5, apgd_steps=5, eot=2)
    torch.manual_seed(0)
    x_adv = Attack(method)(undefended, x, y, settings)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    if method not in ("cw", "deepfool"):  # minimum-norm attacks are unbounded
        assert (x_adv - x).abs().max() <= settings.eps + 1e-5
    if method not in ("cw", "difgsm", "mdifgsm"):  # CW's default budget is small; DI's resizing is random
        assert _accuracy(undefended, x_adv, y) < 1.0


def test_views_attack_the_right_model():
    references = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    defended = DefendedModel(DiffPurify(OracleBackbone(references), steps=2), brightness_classifier(), normalize=None)
    assert Attack("pgd-eot-linf").target(defended) is defended
    assert Attack("pgd-eot-linf", "bpda").target(defended).bpda
    transfer = Attack("fgsm", "transfer").target(defended)
    assert transfer.purifier is None and transfer.classifier is defended.classifier


def test_eot_batch_only_changes_memory_not_the_gradient_of_a_deterministic_model(undefended):
    x, y = separable_data(2)
    torch.testing.assert_close(eot_gradient(undefended, x, y, eot=5, eot_batch=2), 5 * eot_gradient(undefended, x, y))


def test_parse_attacks():
    assert [a.name for a in parse_attacks("pgd-eot-linf, bpda-eot,pgd-eot-linf")] == ["pgd-eot-linf",
                                                                                     "pgd-eot-linf@bpda"]
    transfer = parse_attacks("impure@transfer")
    assert [a.method for a in transfer] == list(PRESETS["impure"]) and {a.view for a in transfer} == {"transfer"}
    assert [a.name for a in parse_attacks("lee-kim")] == ["pgd-eot-linf", "pgd-eot-linf@bpda", "autoattack-rand"]


@pytest.mark.parametrize("text, message", [
    ("pgd-eot", "unknown attack 'pgd-eot'"), ("fgsm@bogus", "unknown attack view"), (" , ", "no attack given"),
])
def test_parse_attacks_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_attacks(text)


@pytest.mark.parametrize("field, value", [("eps", 0.0), ("eps", 8.0), ("step", 2.0), ("steps", 0), ("apgd_steps", 0),
                                          ("eot", 0), ("eot_batch", 0)])
def test_settings_errors(field, value):
    with pytest.raises(ValueError, match=field):
        AttackSettings(**{field: value})


def test_pgd_rejects_unknown_norm(undefended):
    with pytest.raises(ValueError, match="norm"):
        pgd_eot(undefended, *separable_data(2), norm="L1", eps=0.1, step=0.1, steps=1)


def test_ssni_attacked_with_fixed_levels_and_through_the_score_norm():
    from purifytf.purifiers.ssni import SSNIPurify

    g = torch.Generator().manual_seed(0)
    references = 0.5 + 0.05 * torch.randn(4, 1, 4, 4, generator=g)  # close: the purified image depends on x
    clean = (references.repeat(2, 1, 1, 1) + 0.02 * torch.randn(8, 1, 4, 4, generator=g)).clamp(0, 1)

    def defended(score_grad: bool, checkpoint: bool = False) -> DefendedModel:
        base = DiffPurify(OracleBackbone(references), t_star=0.3, steps=2, sampler="ddim", checkpoint=checkpoint)
        purifier = SSNIPurify(base, eps_steps=2, score_grad=score_grad, seed=0)
        purifier.calibrate(clean)
        return DefendedModel(purifier, brightness_classifier(), normalize=None)

    x, y = (references[:2] + 0.02 * torch.randn(2, 1, 4, 4, generator=g)).clamp(0, 1), torch.tensor([0, 1])
    fixed, through = (eot_gradient(defended(flag), x, y) for flag in (False, True))
    assert fixed.norm() > 0 and torch.isfinite(through).all()
    assert (through - fixed).norm() > 1e-3 * fixed.norm()
    torch.testing.assert_close(eot_gradient(defended(True, checkpoint=True), x, y), through)  # same, less memory


def _corner(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The brightness classifier's loss maximiser in the Linf ball: dark images brightened, bright ones darkened."""
    direction = (1 - 2 * y.float())[:, None, None, None]
    return (x + eps * direction).clamp(0, 1)


@pytest.mark.parametrize("sign, expected_step", [(True, 0.007), (False, 0.007 / 4)])
def test_l2_pgd_sign_steps_lee_kim_or_normalised_gradient(undefended, sign, expected_step):
    """One step from x: Lee & Kim move every pixel by 0.007 (sign), the normalised gradient by 0.007 in L2 norm.
    The brightness classifier's gradient is uniform over the 16 pixels, so both are exact."""
    x, y = separable_data(4)
    x_adv = pgd_eot(undefended, x, y, norm="L2", eps=0.5, step=0.007, steps=1, sign=sign, random_start=False)
    torch.testing.assert_close(x_adv, _corner(x, y, expected_step))


def test_l2_sign_pgd_projects_onto_the_l2_ball(undefended):
    x, y = separable_data(4)
    x_adv = pgd_eot(undefended, x, y, norm="L2", eps=0.5, step=0.007, steps=40, sign=True, random_start=False)
    torch.testing.assert_close(x_adv, _corner(x, y, 0.5 / 4))  # 16 equal moves of L2 norm 0.5


def test_l2_attack_names_say_which_step_they_take(undefended):
    x, y = separable_data(4)
    settings = AttackSettings(eps_l2=0.5, step=0.007, step_l2=0.1, steps=1, random_start=False)
    torch.testing.assert_close(Attack("pgd-eot-l2-sign")(undefended, x, y, settings), _corner(x, y, 0.007))
    torch.testing.assert_close(Attack("pgd-eot-l2")(undefended, x, y, settings), _corner(x, y, 0.1 / 4))
    assert [a.name for a in parse_attacks("lee-kim-l2")] == ["pgd-eot-l2-sign"]
    with pytest.raises(ValueError, match="sign"):
        pgd_eot(undefended, x, y, norm="Linf", eps=0.1, step=0.1, steps=1, sign=False)


def _seeded_defence(seed: int | None = 0) -> DefendedModel:
    g = torch.Generator().manual_seed(1)
    references = 0.5 + 0.1 * torch.randn(6, 1, 4, 4, generator=g)
    purifier = DiffPurify(OracleBackbone(references.clamp(0, 1)), t_star=0.4, steps=3, sampler="ddpm", seed=seed)
    return DefendedModel(purifier, brightness_classifier(margin=4.0), normalize=None)


def _deployed_gradient(defended: DefendedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the loss of the function the defence computes for each image, image by image."""
    grads = []
    for xi, yi in zip(x.split(1), y.split(1), strict=True):
        xi = xi.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(defended(xi), yi, reduction="sum"), xi)[0])
    return torch.cat(grads)


def test_eot_against_a_seeded_defence_is_exact():
    """The attacker optimises the function the seeded defence computes: EOT copies and batch-mates change nothing."""
    defended = _seeded_defence()
    assert is_deterministic(defended) and not is_deterministic(_seeded_defence(None))
    x, y = separable_data(4)
    exact = _deployed_gradient(defended, x, y)
    assert exact.abs().sum() > 0
    torch.testing.assert_close(eot_gradient(defended, x, y, eot=4), 4 * exact)
    settings = AttackSettings(eps=0.05, step=0.01, steps=1, eot=4, random_start=False)
    torch.testing.assert_close(Attack("pgd-eot-linf")(defended, x, y, settings), (x + 0.01 * exact.sign()).clamp(0, 1))


class CountingPurifier(nn.Module):
    """Identity plus a little noise from the global RNG; records a fingerprint of every draw."""

    def __init__(self, scale: float = 1e-3):
        super().__init__()
        self.scale = scale
        self.draws: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        self.draws.append(noise.flatten()[0].item())
        return x + self.scale * noise


class CoinPurifier(nn.Module):
    """Per image, with probability ``p`` (global RNG) the negative image (the wrong class), else the image."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flip = (torch.rand(x.shape[0], 1, 1, 1) < self.p).to(x.dtype)
        return flip * (1 - x) + (1 - flip) * x


def test_seeded_eot_runs_one_pass():
    calls = CountingPurifier()
    calls.seed = 0  # a seeded purifier: a fixed function
    defended = DefendedModel(calls, brightness_classifier(), normalize=None)
    eot_gradient(defended, *separable_data(2), eot=5)
    assert len(calls.draws) == 1


def test_autoattack_rand_draws_fresh_purifier_noise_in_every_run():
    """torchattacks reseeds the global RNG before each APGD run, so both runs replayed the same purifier noise."""
    spy = CountingPurifier()
    defended = DefendedModel(spy, brightness_classifier(), runs=3, normalize=None)
    x, y = separable_data(4)
    torch.manual_seed(0)
    Attack("autoattack-rand")(defended, x, y, AttackSettings(eps=0.02, apgd_steps=3, eot=2))
    assert len(spy.draws) > 10 and len(set(spy.draws)) == len(spy.draws)


def test_apgd_returns_the_best_loss_iterate_when_nothing_is_fooled(undefended):
    """A budget too small to flip a wide margin: the loss maximiser (the ball's corner), not the clean image."""
    x, y = separable_data(4)
    torch.manual_seed(0)
    x_adv = apgd(undefended, x, y, losses=("ce", "dlr"), eps=0.02, steps=5)
    torch.testing.assert_close(x_adv, _corner(x, y, 0.02))


def test_autoattack_rand_attacks_every_image_and_judges_by_the_vote(monkeypatch):
    """A defence whose single passes are wrong 20 % of the time but whose 25-run vote is right: every image is
    attacked by both runs (torchattacks skipped images with a wrong single clean pass and dropped images
    once a single pass was fooled)."""
    import torchattacks

    attacked = []
    perturb = torchattacks.APGD.perturb

    def spy(self, x, y, *args, **kwargs):
        attacked.append((self.loss, len(x)))
        return perturb(self, x, y, *args, **kwargs)

    monkeypatch.setattr(torchattacks.APGD, "perturb", spy)
    defended = DefendedModel(CoinPurifier(), brightness_classifier(), runs=25, normalize=None)
    x, y = separable_data(8)
    torch.manual_seed(0)
    assert (defended.predict(x) == y).all()
    x_adv = Attack("autoattack-rand")(defended, x, y, AttackSettings(eps=0.02, apgd_steps=4, eot=2))
    assert attacked == [("ce", 8), ("dlr", 8)]
    assert (x_adv != x).flatten(1).any(1).all() and (x_adv - x).abs().max() <= 0.02 + 1e-6  # none returned clean


def test_surrogate_view_attacks_a_two_call_uniform_ddim():
    from purifytf import SaliencyDiffPurify

    references = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    backbone = OracleBackbone(references)
    purifier = SaliencyDiffPurify(backbone, brightness_classifier(), t_l=0.2, t_s=0.1, stages=lambda x: [x])
    surrogate = uniform_surrogate(purifier)
    assert isinstance(surrogate, DiffPurify) and surrogate.backbone is backbone
    assert (surrogate.t_star, surrogate.num_steps, surrogate.sampler) == (0.2, 2, "ddim")
    defended = DefendedModel(purifier, brightness_classifier(), normalize=None)
    assert Attack("pgd-eot-linf", "surrogate").target(defended).purifier.num_steps == 2
    with pytest.raises(ValueError, match="diffusion purifier"):
        uniform_surrogate(CountingPurifier())
