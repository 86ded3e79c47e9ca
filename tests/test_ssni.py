"""SSNIPurify with the exact oracle backbone: per-sample levels, calibration, Hub format, gradients."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from purifytf.diffusion import OracleBackbone
from purifytf.nfe import count_nfe
from purifytf.purifiers.diffpure import DiffPurify
from purifytf.purifiers.ssni import SSNIPurify, linear_reweight, sigmoid_reweight
from purifytf.score import expected_perturbation_score

EPS_STEPS = 4


def make_base(references, **kwargs) -> DiffPurify:
    return DiffPurify(OracleBackbone(references), t_star=0.3, steps=3, **kwargs)


def clean_set(references, copies=4, jitter=0.01, seed=0):
    """Clean images near the references (calibration needs distinct norms)."""
    g = torch.Generator().manual_seed(seed)
    x = references.repeat(copies, 1, 1, 1)
    return (x + jitter * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture
def purifier(references) -> SSNIPurify:
    p = SSNIPurify(make_base(references), eps_steps=EPS_STEPS, seed=0)
    p.calibrate(clean_set(references), batch_size=8)
    return p


def pushed(references, scales):
    """references[0] moved away along a fixed sign pattern by each scale: (len(scales), C, H, W)."""
    direction = torch.randn(references[:1].shape, generator=torch.Generator().manual_seed(3)).sign()
    return torch.cat([(references[:1] + s * direction).clamp(0, 1) for s in scales])


def test_eps_kernel_shares_noise_across_batch(references):
    base = make_base(references)
    x = references * 2 - 1
    batch = expected_perturbation_score(base.schedule, base.eps, x, 3, torch.Generator().manual_seed(1))
    alone = expected_perturbation_score(base.schedule, base.eps, x[2:3], 3, torch.Generator().manual_seed(1))
    assert batch.shape == x.shape
    assert torch.allclose(batch[2:3], alone, rtol=1e-5, atol=1e-3)
    with count_nfe() as counter:
        expected_perturbation_score(base.schedule, base.eps, x, 5, None)
    assert counter.count == 5


def test_reweight_kernels():
    norm = torch.tensor([0.0, 1.0, 2.0, 9.0])
    assert sigmoid_reweight(norm, 1.0, 0.5, 100, 5)[1].item() == pytest.approx(52.5)
    assert linear_reweight(norm, 1.0, 3.0, 100, 5).tolist() == [5.0, 5.0, 55.0, 105.0]


@pytest.mark.parametrize("reweight", ["sigmoid", "linear"])
def test_further_from_references_gets_more_noise(purifier, references, reweight):
    p = SSNIPurify(purifier.base, reweight=reweight, eps_steps=EPS_STEPS, stats=purifier.stats, seed=0)
    t = p.noise_levels(pushed(references, [0.0, 0.005, 0.01, 0.02, 0.1]))
    assert t.dtype == torch.long and t.shape == (5,)
    assert torch.all(t[1:] >= t[:-1]) and t[-1] > t[0]
    assert p.largest_level == pytest.approx(p.base.reference_level + 5)  # bias 0.005 of T = 1000: 5 steps
    assert t.min() >= 1 and t.max() <= p.largest_level


def test_level_of_a_sample_ignores_its_batch(purifier, references):
    x = torch.cat([clean_set(references, copies=1), pushed(references, [0.01, 0.05])])
    together = purifier.noise_levels(x)
    alone = torch.cat([purifier.noise_levels(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)
    assert len(set(together.tolist())) > 1  # the levels differ per sample
    purifier(x)
    assert torch.equal(purifier.last_t, together)
    purifier(x[3:5])
    assert torch.equal(purifier.last_t, together[3:5])


def test_purify_shape_nfe_and_seed(purifier):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    out = purifier(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert purifier.last_nfe == EPS_STEPS + purifier.base.num_steps
    assert torch.equal(purifier(x), out)
    purifier.seed = 1
    assert not torch.equal(purifier(x), out)


def test_calibration_round_trips_through_hub_format(purifier, references, tmp_path):
    x = pushed(references, [0.0, 0.02])
    expected = purifier(x)
    purifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stats"] == purifier.stats and config["base"]["_class_name"] == "DiffPurify"
    loaded = SSNIPurify.from_pretrained(tmp_path)
    assert loaded.stats == purifier.stats
    assert isinstance(loaded.base, DiffPurify) and loaded.base.steps == 3
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded.last_t, purifier.last_t)


def test_calibrate_from_a_dataloader_matches_a_tensor(references):
    images = clean_set(references)
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=8)
    p = SSNIPurify(make_base(references), eps_steps=EPS_STEPS, seed=0)
    stats = p.calibrate(loader)
    assert stats == SSNIPurify(make_base(references), eps_steps=EPS_STEPS, seed=0).calibrate(images, batch_size=8)
    assert stats["count"] == len(images) and stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] > 0


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.rand(0, 1, 8, 8), "empty"),
        ([], "empty"),
        (torch.rand(4, 3, 8, 8), "channel"),
        (torch.rand(8, 8), "shape"),
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (torch.rand(1, 1, 8, 8), "at least 2"),
        (torch.rand(4, 1, 8, 8) * 255, r"expected \[0, 1\]"),
    ],
)
def test_bad_calibration_data_is_rejected(references, data, match):
    p = SSNIPurify(make_base(references), eps_steps=EPS_STEPS)
    with pytest.raises(ValueError, match=match):
        p.calibrate(data)
    assert p.stats is None


def test_uncalibrated_use_is_an_error(references):
    p = SSNIPurify(make_base(references), eps_steps=EPS_STEPS)
    with pytest.raises(RuntimeError, match="calibrate"):
        p(references)
    with pytest.raises(RuntimeError, match="calibrate"):
        p.noise_levels(references)


def test_constructor_checks(references):
    base = make_base(references)
    good = {"mean": 1.0, "std": 0.5, "min": 0.0, "max": 2.0, "count": 10, "eps_steps": 20}
    with pytest.raises(TypeError, match="DiffusionPurifier"):
        SSNIPurify(OracleBackbone(references))
    with pytest.raises(ValueError, match="reweight"):
        SSNIPurify(base, reweight="step")
    with pytest.raises(ValueError, match="tau"):
        SSNIPurify(base, tau=0.0)
    with pytest.raises(ValueError, match="eps_steps"):
        SSNIPurify(base, eps_steps=0)
    with pytest.raises(ValueError, match="every sample would get the lowest level"):
        SSNIPurify(base, bias=-0.3)  # t* + bias = 0 steps
    with pytest.raises(ValueError, match="lacks"):
        SSNIPurify(base, stats={"mean": 1.0})
    with pytest.raises(ValueError, match="degenerate"):
        SSNIPurify(base, stats=good | {"max": 0.0})
    assert SSNIPurify(base, stats=good).stats == good
    with pytest.raises(ValueError, match="calibrated with eps_steps=20"):
        SSNIPurify(base, stats=good, eps_steps=10)


def test_statistics_of_another_eps_steps_are_refused(purifier, references):
    """The score norm averages eps_steps levels: statistics of another T' would pick wrong levels silently."""
    assert purifier.stats["eps_steps"] == purifier.eps_steps == EPS_STEPS
    purifier.eps_steps = EPS_STEPS + 1
    with pytest.raises(ValueError, match=f"calibrated with eps_steps={EPS_STEPS}"):
        purifier(references)
    purifier.eps_steps = EPS_STEPS


def test_default_picks_t_without_gradient(purifier, references):
    far = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    (grad,) = torch.autograd.grad(purifier(far).square().sum(), far)
    assert grad.abs().sum() > 0  # through the base purifier only
    t = purifier.noise_levels(pushed(references, [0.005, 0.01]).requires_grad_())
    assert not t.requires_grad and t.dtype == torch.long


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_score_grad_differentiates_through_the_score_norm(purifier, references, sampler):
    base = make_base(references, sampler=sampler)
    through = SSNIPurify(base, eps_steps=EPS_STEPS, score_grad=True, stats=purifier.stats, seed=0)
    x = pushed(references, [0.005, 0.01]).requires_grad_()
    t = through.noise_levels(x)
    assert t.requires_grad and torch.equal(t.detach().round().long(), purifier.noise_levels(x.detach()))
    (grad,) = torch.autograd.grad(t.sum(), x)
    assert grad.abs().sum() > 0  # d t / d x through the score norm (straight-through rounding)
    (grad,) = torch.autograd.grad(through(x).square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_saliency_base_rescales_both_levels_per_sample(purifier, references):
    from purifytf.purifiers.saliency_diffpure import SaliencyDiffPurify

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3),
    )
    base = SaliencyDiffPurify(OracleBackbone(references), classifier, t_l=0.2, t_s=0.1, spacing=50)
    p = SSNIPurify(base, eps_steps=EPS_STEPS, stats=purifier.stats, seed=0)
    x = torch.cat([clean_set(references, copies=1), pushed(references, [0.01, 0.05])])
    out = p(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert p.last_nfe == EPS_STEPS + base.num_steps
    t = p.last_t
    assert len(set(t.tolist())) > 1 and t.max() <= base.reference_level + p.bias * 1000
    p(x[4:])
    assert torch.equal(p.last_t, t[4:])


def test_ssni_is_a_level_rule_of_the_base_pipeline(purifier, references, monkeypatch):
    """The base's own pipeline runs: one conversion to model space, the mask once on the [0, 1] image, the
    level the base actually diffused to as last_t, one generator (SSNI's) for score and chain."""
    from purifytf.purifiers.saliency_diffpure import SaliencyDiffPurify

    classifier = torch.nn.Sequential(torch.nn.Conv2d(references.shape[1], 4, 3, padding=1), torch.nn.ReLU(),
                                     torch.nn.Flatten(), torch.nn.LazyLinear(3))
    classifier(references)
    base = SaliencyDiffPurify(OracleBackbone(references), classifier, t_l=0.2, t_s=0.1, spacing=50, seed=9)
    p = SSNIPurify(base, eps_steps=EPS_STEPS, stats=purifier.stats)
    assert p.seed == 9  # the base's seed unless told otherwise
    seen = []
    compute_mask = base.compute_mask
    monkeypatch.setattr(base, "compute_mask", lambda x: seen.append(x) or compute_mask(x))
    x = pushed(references, [0.0, 0.05])
    out = p(x)
    assert len(seen) == 1 and torch.equal(seen[0], x)  # once, on the image in [0, 1]
    assert p.last_t is base.last_t and torch.equal(p.last_t, p.noise_levels(x))
    assert torch.equal(SSNIPurify(base, eps_steps=EPS_STEPS, stats=purifier.stats)(x), out)


def test_constant_level_is_recorded(references):
    base = make_base(references, seed=0)
    base(references)
    assert base.last_t.tolist() == [base.reference_level] * len(references)
