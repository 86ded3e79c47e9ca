"""Attacks: an undefended classifier falls, budgets hold, names parse, views pick the right model."""

import pytest
import torch
from torch import nn

from purifytf import DiffPurify, OracleBackbone
from purifytf.attacks import PRESETS, Attack, AttackSettings, eot_gradient, parse_attacks, pgd_eot
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
    x_adv = Attack("pgd-eot-linf")(undefended, x, y, AttackSettings(eps=0.02, step=0.01, steps=5, eot=1), 3)
    assert _accuracy(undefended, x_adv, y) == 1.0


@pytest.mark.parametrize("method", [*PRESETS["impure"], "autoattack-rand"])
def test_torchattacks_methods_run_within_budget(undefended, method):
    x, y = separable_data(4)
    settings = AttackSettings(eps=0.2, step=0.05, steps=5, apgd_steps=5, eot=2)
    torch.manual_seed(0)
    x_adv = Attack(method)(undefended, x, y, settings, 3)
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


@pytest.mark.parametrize("field, value", [("eps", 0.0), ("steps", 0), ("apgd_steps", 0), ("eot", 0), ("eot_batch", 0)])
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
