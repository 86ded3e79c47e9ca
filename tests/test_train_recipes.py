"""The classifier and DDPM recipes (the embedded default's) on the shared training loop."""

import json

import pytest
import safetensors.torch
import torch

from purifytf.diffusion import OracleBackbone
from purifytf.diffusion.backbones import build_backbone
from purifytf.models import SmallCNN
from purifytf.train import ArrayData
from purifytf.train.classifier import ClassifierTrainer, accuracy, augment
from purifytf.train.ddpm import DDPMTrainer, denoising_psnr
from purifytf.train.loop import OptimConfig

TINY_UNET = {"kind": "diffusers_unet2d", "schedule": {"kind": "linear", "num_steps": 100},
             "unet": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8],
                      "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 2,
                      "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4}}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=8, size=8, seed=0):
    return torch.rand(n, 1, size, size, generator=gen(seed))


def test_augment_moves_whole_pixels_and_flips():
    x = images(64)
    out = augment(x, gen(), shift=2, flip=True)
    for i in range(len(x)):  # each output is one of the 5 x 5 x 2 exact moves of its input
        moves = []
        for flipped in (x[i], x[i].flip(-1)):
            padded = torch.nn.functional.pad(flipped, (2, 2, 2, 2))
            moves += [padded[:, 2 + dy: 10 + dy, 2 + dx: 10 + dx] for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], m) for m in moves), i
    assert torch.equal(augment(x, gen(), shift=0, flip=False), x)
    assert torch.equal(augment(x, gen(3)), augment(x, gen(3)))


def test_classifier_recipe_learns_a_separable_task():
    torch.manual_seed(0)
    x = images(64)
    labels = (x.mean((1, 2, 3)) > x.mean()).long()
    x = x + 0.3 * labels.view(-1, 1, 1, 1)  # class 1 is brighter
    data = ArrayData(x.clamp(0, 1), labels)
    model = SmallCNN(in_channels=1, num_classes=2, width=4, image_size=8, hidden=8)
    config = OptimConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, weight_decay=0.0)
    ClassifierTrainer(model, data, config, shift=0, flip=False).fit(progress=False)
    assert not model.training
    assert accuracy(model, data) >= 0.95


def ddpm_trainer(seed=0, steps=6):
    torch.manual_seed(seed)
    config = OptimConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.0)
    return DDPMTrainer(build_backbone(TINY_UNET), ArrayData(images(8)), config, ema_decay=0.9)


def test_ddpm_resume_repeats_the_uninterrupted_run_with_its_average(tmp_path):
    straight = ddpm_trainer()
    history = straight.fit(progress=False)
    ddpm_trainer().fit(tmp_path, stop=3, progress=False)
    resumed = ddpm_trainer(seed=5)
    resumed.load(tmp_path)
    assert resumed.fit(progress=False) == history[3:]
    for mine, theirs in ((resumed.model, straight.model), (resumed.network, straight.network)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    # the checkpoint is the averaged backbone plus its config: it loads strictly into a fresh build
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["unet"]["block_out_channels"] == [8, 8]
    fresh = build_backbone(config)
    safetensors.torch.load_model(fresh, tmp_path / "model.safetensors", strict=True)


def test_ddpm_average_lags_the_trained_weights():
    trainer = ddpm_trainer(steps=4)
    before = [p.clone() for p in trainer.model.parameters()]
    trainer.fit(progress=False)
    live, average = trainer.network.parameters(), trainer.model.parameters()
    moved = [(a - b).abs().sum() for a, b in zip(average, before, strict=True)]
    gap = [(a - b).abs().sum() for a, b in zip(trainer.model.parameters(), live, strict=True)]
    assert sum(moved) > 0 and sum(gap) > 0
    assert all(not p.requires_grad for p in trainer.model.parameters())


def test_denoising_psnr_of_the_exact_denoiser():
    """The closed-form optimal denoiser of the test set itself recovers it: far higher PSNR than a bad one."""
    x = images(4)
    oracle = OracleBackbone(x)
    high = denoising_psnr(oracle, x, 20, gen())
    assert high > 40
    assert denoising_psnr(oracle, x, 900, gen()) < high
    with pytest.raises(RuntimeError):
        denoising_psnr(oracle, images(4, size=6), 20, gen())  # the oracle's references are 8x8
