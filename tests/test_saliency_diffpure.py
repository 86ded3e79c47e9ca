import gc

import pytest
import timm
import torch
import torchvision
from test_saliency import hook_count, tiny_cnn
from torch import nn
from torchvision.transforms import v2

from purifytf.diffusion.backbones import OracleBackbone
from purifytf.nfe import count_nfe
from purifytf.purifiers.diffpure import DiffPurify
from purifytf.purifiers.saliency_diffpure import SaliencyDiffPurify, heterogeneous_ddim, level_map

SIZE = 16


@pytest.fixture(scope="module")
def oracle():
    return OracleBackbone(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_defaults_and_nfe(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn())
    assert (p.reference_level, p.small_level, p.stage_steps) == (200, 100, (5, 5))
    assert SaliencyDiffPurify(oracle, tiny_cnn(), spacing=2).num_steps == 100
    with count_nfe() as counter:
        out = p(images)
    assert out.shape == images.shape and p.last_nfe == counter.count == 10  # the classifier pass is no NFE


def test_all_zeros_mask_is_diffpure_at_t_s(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn())
    x = images * 2 - 1
    ours = p.denoise(x, gen(), mask=torch.zeros(2, 1, SIZE, SIZE))
    ref = DiffPurify(oracle, t_star=0.1, sampler="ddim", steps=p.stage_steps[1]).denoise(x, gen())
    assert torch.equal(ours, ref)


def test_all_ones_mask_is_diffpure_at_t_l(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn(), resample_steps=0)
    x = images * 2 - 1
    ours = p.denoise(x, gen(), mask=torch.ones(2, 1, SIZE, SIZE))
    ref = DiffPurify(oracle, t_star=0.2, sampler="ddim", steps=p.num_steps).denoise(x, gen())
    assert torch.equal(ours, ref)


def test_non_salient_pixels_carry_exactly_t_s_noise(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn())
    schedule, stage1 = p.schedule, p.stage_steps[0]
    x = images * 2 - 1
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[..., :8, :] = 1
    seen = []

    def eps(x_t, t):
        seen.append((x_t, t))
        return p.eps(x_t, t)

    grid = torch.cat([torch.arange(200, 99, -20), torch.arange(80, -1, -20)])[:, None].expand(-1, 2)
    t_map = level_map(mask, grid[: stage1 + 1])
    assert set(t_map.unique().tolist()) == {100, 200}
    z0 = torch.randn(x.shape, generator=gen())  # the first draw
    g = gen()
    heterogeneous_ddim(schedule, eps, x, t_map, grid, stage1, 3, lambda like: torch.randn(like.shape, generator=g))
    assert [t[0].item() for _, t in seen] == [203, 183, 163, 143, 123, 100, 80, 60, 40, 20]
    x_ts, t = seen[stage1]
    assert t.tolist() == [100, 100]
    abar = schedule.alpha_bar(100)
    injected = (x_ts - abar.sqrt() * x) / (1 - abar).sqrt()  # noise at level t_s in every pixel
    quiet = ~mask.bool().expand_as(x)
    assert torch.equal(x_ts[quiet], schedule.q_sample(x, t, z0)[quiet])
    torch.testing.assert_close(injected[quiet], z0[quiet], rtol=0, atol=1e-4)
    assert (injected[~quiet] - z0[~quiet]).abs().mean() > 0.3  # salient pixels: stronger noise, partly denoised


def test_continuous_mode_snaps_to_stage1_grid(oracle, images):
    grid = torch.tensor([[200, 180, 160, 140, 120, 100]]).T
    sal = torch.tensor([0.0, 0.14, 0.36, 0.5, 1.0]).view(1, 1, 1, 5)
    assert level_map(sal, grid).flatten().tolist() == [100, 120, 140, 160, 200]
    sal.requires_grad_(True)
    levels = level_map(sal, grid)
    levels.sum().backward()
    assert levels.flatten().tolist() == [100, 120, 140, 160, 200] and torch.equal(sal.grad, torch.full_like(sal, 100))
    p = SaliencyDiffPurify(oracle, tiny_cnn(), mask="continuous", seed=0)
    assert p(images).shape == images.shape and p.last_nfe == 10


@pytest.mark.parametrize("make", [
    lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10),
    lambda: torchvision.models.resnet18(weights=None, num_classes=10),
    lambda: nn.Sequential(v2.Normalize([0.5] * 3, [0.25] * 3), torchvision.models.resnet18(weights=None)),
    tiny_cnn,
], ids=["timm", "torchvision", "normalised", "custom"])
def test_classifiers(make, oracle, images):
    clf = make().train()
    p = SaliencyDiffPurify(oracle, clf, mask="topk", seed=0)
    mask = p.compute_mask(images)
    assert mask.shape == (2, 1, SIZE, SIZE) and mask.sum().item() == 2 * int(0.15 * SIZE * SIZE)
    out = p(images)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert not clf.training and hook_count(clf) == 0


def test_differentiable(images):
    oracle = OracleBackbone(0.5 + 0.01 * torch.randn(8, 3, SIZE, SIZE, generator=gen()))  # a soft posterior
    x = images.clone().requires_grad_(True)
    SaliencyDiffPurify(oracle, tiny_cnn(), seed=0)(x).sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    clf = tiny_cnn()
    p = SaliencyDiffPurify(oracle, clf, mask="continuous", mask_grad=True, seed=0)
    clf.requires_grad_(True)  # purifiers freeze their networks: ask for parameter gradients explicitly
    x.grad = None
    p(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and clf[0].weight.grad.abs().sum() > 0  # through the saliency
    clf.zero_grad()
    default = SaliencyDiffPurify(oracle, clf, seed=0)
    clf.requires_grad_(True)
    default(x).sum().backward()
    assert clf[0].weight.grad is None or clf[0].weight.grad.abs().sum() == 0  # default: no gradient via the mask


def test_level_scale_for_ssni(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn())
    x = images * 2 - 1
    assert torch.equal(p.denoise(x, gen(), torch.ones(2)), p.denoise(x, gen()))
    scale = torch.tensor([0.5, 1.5], requires_grad=True)
    p.denoise(x, gen(), scale).sum().backward()
    assert torch.isfinite(scale.grad).all()


def test_seedable(oracle, images):
    p = SaliencyDiffPurify(oracle, tiny_cnn(), seed=3)
    assert torch.equal(p(images), p(images))
    assert not torch.equal(p(images), SaliencyDiffPurify(oracle, p.classifier, seed=4)(images))


def test_v2_pipeline(oracle):
    p = SaliencyDiffPurify(oracle, tiny_cnn(), seed=0)
    pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), p])
    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
    out, label = pipeline(image, 3)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32 and label == 3


def test_argument_errors(oracle, images):
    clf = tiny_cnn()
    with pytest.raises(ValueError, match="t_s < t_l"):
        SaliencyDiffPurify(oracle, clf, t_l=0.1, t_s=0.2)
    with pytest.raises(ValueError, match="at least one step above"):
        SaliencyDiffPurify(oracle, clf, t_l=0.2004, t_s=0.2)  # both 200 steps of 1000
    with pytest.raises(ValueError, match="mask must be one of"):
        SaliencyDiffPurify(oracle, clf, mask="soft")
    with pytest.raises(TypeError, match="nn.Module"):
        SaliencyDiffPurify(oracle, lambda x: x)
    grey = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())  # the oracle purifies 3-channel images
    with pytest.raises(ValueError, match="classifier takes 1-channel images but the backbone purifies 3-channel"):
        SaliencyDiffPurify(oracle, grey)
    with pytest.raises(ValueError, match="mask must have shape"):
        SaliencyDiffPurify(oracle, clf).denoise(images, None, mask=torch.ones(2, 3, SIZE, SIZE))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 10))
    with pytest.raises(ValueError, match="could not find the feature maps"):
        SaliencyDiffPurify(oracle, mlp)(images)


def test_hub_round_trip(oracle, images, tmp_path):
    p = SaliencyDiffPurify(oracle, tiny_cnn(), mask="topk", fraction=0.2, stages=["1", "3"], seed=0)
    p.save_pretrained(tmp_path)
    q = SaliencyDiffPurify.from_pretrained(tmp_path, classifier=tiny_cnn())
    assert (q.mask, q.fraction, q.stages, q.seed) == ("topk", 0.2, ["1", "3"], 0)
    assert torch.equal(q.classifier[0].weight, p.classifier[0].weight)
    assert torch.equal(q(images), p(images))
    with pytest.raises(TypeError, match="classifier="):
        SaliencyDiffPurify.from_pretrained(tmp_path)


def test_thousand_calls_leave_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clf = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2, padding=1),
                        nn.Flatten(), nn.Linear(8, 2))
    p = SaliencyDiffPurify(OracleBackbone(torch.rand(2, 3, 4, 4)), clf, spacing=100, seed=0)
    x = torch.rand(3, 4, 4)
    for _ in range(20):
        p(x)
    gc.collect()
    objects = len(gc.get_objects())
    for _ in range(1000):
        p(x)
    gc.collect()
    assert hook_count(p) == 0 and not torch.nn.modules.module._global_forward_hooks
    assert len(gc.get_objects()) - objects < 50
    assert list(tmp_path.iterdir()) == []
