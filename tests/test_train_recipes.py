"""The classifier and DDPM recipes (the embedded default's) on the shared training loop."""

import gzip
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from purifytf.data import fashion_mnist
from purifytf.diffusion import OracleBackbone
from purifytf.diffusion.backbones import build_backbone
from purifytf.evaluation.clean import accuracy
from purifytf.models import SmallCNN
from purifytf.train import ArrayData
from purifytf.train.classifier import ClassifierTrainer, augment, train_heldout_classifier
from purifytf.train.ddpm import DDPMTrainer, _noised, denoising_psnr
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
    other = ddpm_trainer()
    other.ema_decay, other.t_power = 0.5, 2.0  # another recipe: refused, not mixed into the run
    with pytest.raises(ValueError, match="ema_decay: 0.9 in the checkpoint, 0.5 now, t_power: 1.0 .*, 2.0 now"):
        other.load(tmp_path)


def classifier_trainer(global_seed: int, **config):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=2, width=4, image_size=8, hidden=8, dropout=0.5)
    torch.manual_seed(global_seed)  # a new process: the global RNG, which dropout draws from, is elsewhere
    data = ArrayData(images(32), torch.arange(32) % 2)
    settings = {"steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, **config}
    return ClassifierTrainer(model, data, OptimConfig(**settings), shift=0, flip=False)


def test_resume_with_dropout_repeats_the_uninterrupted_run(tmp_path):
    """Dropout draws from the global RNG: a checkpoint carries its state, so a resumed sitting draws the same."""
    straight = classifier_trainer(1)
    history = straight.fit(progress=False)
    classifier_trainer(1).fit(tmp_path, stop=3, progress=False)
    resumed = classifier_trainer(2)
    resumed.load(tmp_path)
    assert resumed.fit(progress=False) == history[3:]
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_other_settings_and_a_torn_checkpoint(tmp_path):
    classifier_trainer(1).fit(tmp_path, stop=3, progress=False)
    with pytest.raises(ValueError, match="keep the checkpoint's settings.*lr: 0.01 in the checkpoint, 0.02 now"):
        classifier_trainer(1, lr=2e-2).load(tmp_path)
    flipping = classifier_trainer(1)
    flipping.flip = True  # a recipe setting beyond the config
    with pytest.raises(ValueError, match="flip: False in the checkpoint, True now"):
        flipping.load(tmp_path)
    longer = classifier_trainer(1, steps=9, checkpoint_every=1)  # adopt: the horizon comes from the checkpoint
    longer.load(tmp_path, adopt=("steps",))
    assert longer.config.steps == 6 and longer.config.checkpoint_every == 1
    model = tmp_path / "model.safetensors"  # stopped after the weights, before the state file, were rewritten
    model.write_bytes(model.read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match="not the one saved with step 3"):
        classifier_trainer(1).load(tmp_path)


def test_a_killed_sitting_is_recorded_up_to_its_last_checkpoint(tmp_path):
    """The sitting log follows the checkpoints: a run killed after step 4 (checkpoints at 2 and 4) records [0, 4]."""
    from purifytf.train.record import fit_sitting

    trainer = classifier_trainer(1, checkpoint_every=2)
    real = trainer.train_step

    def killed_after_four(*args):
        if trainer.step == 5:
            raise KeyboardInterrupt
        return real(*args)

    trainer.train_step = killed_after_four
    sittings, log = [], tmp_path / "sittings.json"
    with pytest.raises(KeyboardInterrupt):
        fit_sitting(trainer, tmp_path, 6, log, sittings, "cpu", progress=False, stage="pretrain")
    assert [s["steps"] for s in json.loads(log.read_text())] == [[0, 4]]
    resumed = classifier_trainer(1, checkpoint_every=2)
    resumed.load(tmp_path)
    fit_sitting(resumed, tmp_path, 6, log, json.loads(log.read_text()), "cpu", progress=False, stage="pretrain")
    assert [s["steps"] for s in json.loads(log.read_text())] == [[0, 4], [4, 6]]


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


def test_heldout_classifier_is_trained_reproducibly_and_cached(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"train": ArrayData(torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                                 rng.integers(0, 10, 128)),
              "test": ArrayData(torch.rand(16, 1, 28, 28), rng.integers(0, 10, 16))}

    def no_data(split):
        raise AssertionError(f"a cached classifier must not read the {split} data")

    first = train_heldout_classifier(splits.__getitem__, steps=2, cache=tmp_path / "a")
    again = train_heldout_classifier(splits.__getitem__, steps=2, cache=tmp_path / "b")
    cached = train_heldout_classifier(no_data, steps=2, cache=tmp_path / "a")  # loads, does not train
    for other in (again, cached):
        assert not other.training
        for p, q in zip(first.state_dict().values(), other.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["architecture"] == "AllConvNet" and 0 <= metrics["test_accuracy"] <= 1
    assert first(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert not any(isinstance(m, nn.MaxPool2d) for m in first.modules())  # another architecture than SmallCNN


def test_fashion_mnist_reads_the_idx_files(tmp_path):
    for prefix, n in (("train", 6), ("t10k", 4)):
        header = struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", n, 28, 28)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + np.full((n, 28, 28), 255, np.uint8).tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n) + bytes(range(n)))
    test = fashion_mnist(tmp_path, "test")
    assert len(test) == 4 and test.images.shape == (4, 1, 28, 28) and test.images.max() == 1.0
    assert test.labels.tolist() == [0, 1, 2, 3] and len(fashion_mnist(tmp_path, "train")) == 6
    with pytest.raises(ValueError, match="split"):
        fashion_mnist(tmp_path, "val")


@pytest.mark.parametrize("t_power", [1.0, 2.0])
def test_ddpm_timesteps_follow_the_chosen_distribution(t_power):
    """t = 1 + floor(u ** t_power * max_t): uniform on [1, max_t] for 1, P(t <= s) = (s / max_t) ** (1 / p) else."""
    backbone = build_backbone(TINY_UNET)
    x0 = torch.zeros(20000, 1, 1, 1)
    _, t, _ = _noised(backbone, x0, gen(), max_t=40, t_power=t_power)
    assert t.min() == 1 and t.max() == 40
    for s in (10, 20, 30):
        assert (t <= s).float().mean().item() == pytest.approx((s / 40) ** (1 / t_power), abs=0.015)
    with pytest.raises(ValueError, match="t_power"):
        DDPMTrainer(backbone, ArrayData(images(4), torch.zeros(4, dtype=torch.long)), OptimConfig(steps=1),
                    t_power=0)
