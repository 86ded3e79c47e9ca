"""The embedded Fashion-MNIST default: the bundled models load through the entry points and do their job."""

import json

import pytest
import torch

from purifytf import hub, pretrained
from purifytf.__main__ import main
from purifytf.data import ArrayData
from purifytf.evaluation.clean import accuracy
from purifytf.evaluation.data import load_dataset
from purifytf.train.ddpm import denoising_psnr

PARTS = ("classifier", "ddpm", "impure", "ssni")
IMPURIFY_KEEPS = {"classifier": 0.85, "heldout_classifier": 0.85}  # issue 18: at least 85 % for any classifier


@pytest.fixture(scope="module")
def data():
    return load_dataset("bundled:fashion-mnist")


def metrics(part):
    return json.loads((hub.ASSETS / "fashion-mnist" / part / "metrics.json").read_text())


def test_test_slice(data):
    assert len(data) == 1000
    assert data.images.shape == (1000, 1, 28, 28) and 0 <= data.images.min() and data.images.max() <= 1
    assert torch.bincount(torch.as_tensor(data.labels)).min() >= 80  # every class is there


def test_shipped_assets_fit_the_budget():
    files = [p for p in (hub.ASSETS / "fashion-mnist").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".ckpt")]  # safetensors and JSON only


@pytest.mark.parametrize("part", PARTS)
def test_every_part_records_its_recipe(part):
    recorded = metrics(part)
    assert {"seed", "seconds", "machine", "device"} <= set(recorded)


def test_classifier_accuracy(data):
    classifier = pretrained.fashion_mnist_cnn(pretrained=True)
    assert not classifier.training
    assert accuracy(classifier, data) >= 0.90
    assert metrics("classifier")["test_accuracy"] >= 0.90  # on all 10,000 test images


def test_backbone_denoises(data):
    backbone = pretrained.diff_purify(pretrained=True).backbone
    images = data.images[:250]
    psnr_100 = denoising_psnr(backbone, images, 100, torch.Generator().manual_seed(0))
    psnr_200 = denoising_psnr(backbone, images, 200, torch.Generator().manual_seed(0))
    assert psnr_100 > psnr_200 > 17  # noisy input alone at t=200 (abar ~ 0.68) is ~ 10 dB
    assert psnr_100 == pytest.approx(metrics("ddpm")["psnr_t100"], abs=1.0)


def test_impurify_keeps_clean_accuracy_as_recorded(data):
    """The shipped IMPurify on the whole slice, purified as the recipe records it (one generator, seed 0)."""
    purifier = pretrained.im_purify(pretrained=True)
    classifier = pretrained.fashion_mnist_cnn(pretrained=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        purified = torch.cat([purifier.purify(x, generator) for x in data.images.split(500)])
    recorded = metrics("impure")
    assert accuracy(classifier, ArrayData(purified, data.labels)) == pytest.approx(
        recorded["classifier_accuracy_after_purification"], abs=0.01)
    psnr = (10 * torch.log10(1 / (purified.clamp(0, 1) - data.images).square().flatten(1).mean(1))).mean()
    assert psnr.item() == pytest.approx(recorded["psnr"], abs=0.1)
    for name in ("classifier", "heldout_classifier"):  # the second one: another architecture, unused in training
        assert recorded[f"{name}_accuracy_after_purification"] >= IMPURIFY_KEEPS[name], name


def test_ssni_uses_the_bundled_statistics(data):
    saved = json.loads((hub.ASSETS / "fashion-mnist" / "ssni" / "stats.json").read_text())
    purifier = pretrained.ssni_purify(pretrained=True, seed=0)
    assert purifier.eps_steps == saved["eps_steps"]
    assert purifier.stats["mean"] == pytest.approx(saved["mean"])
    with torch.no_grad():
        t_clean = purifier.noise_levels(data.images[:32]).float()
        t_noisy = purifier.noise_levels((data.images[:32] + 0.15 * torch.randn(32, 1, 28, 28)).clamp(0, 1)).float()
    assert t_noisy.mean() > t_clean.mean()  # inputs off the data manifold get more noise


@pytest.mark.parametrize("args, message", [(["--images", "0"], "--images must be in [1, 1000]"),
                                           (["--images", "-5"], "--images must be in [1, 1000]"),
                                           (["--steps", "0"], "--steps must be >= 1"),
                                           (["--eps", "8"], "--eps is a radius for images in [0, 1]")])
def test_demo_refuses_settings_it_cannot_run(tmp_path, capsys, args, message):
    assert main(["demo", *args, "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--images", "4", "--steps", "1", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for row in ("no defence", "DiffPurify", "SaliencyDiffPurify", "SSNIPurify", "IMPurify", "JPEGPurify"):
        assert f"| {row}" in printed
    assert (out / "demo.png").stat().st_size > 10_000 and (out / "table.md").exists()
