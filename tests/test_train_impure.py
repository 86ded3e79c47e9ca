"""The IMPure training recipe, its data sources and its command line."""

import argparse
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from test_impure import SMALL
from torch import nn

from purifytf.base import Purifier
from purifytf.data import ImageFolderData, to_images
from purifytf.purifiers.impure import IMPurify
from purifytf.train import ArrayData, FeatureLoss, IMPureTrainer, TrainConfig, cli, open_data, patch_mix, pgd_attack
from purifytf.train.loop import lr_factor


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small(seed=0) -> IMPurify:
    torch.manual_seed(seed)
    return IMPurify(in_channels=1, overrides=SMALL)


def waves(n=4, size=12) -> torch.Tensor:
    """(n, 1, size, size) smooth images in [0.1, 0.9]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * ((k % 2 + 1) * xx + (k // 2) * yy + k / n))
                        for k in range(n)]).unsqueeze(1)


def classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 3))


def test_overfits_a_tiny_batch():
    config = TrainConfig(steps=60, batch_size=4, lr=3e-3, warmup_steps=5)
    history = IMPureTrainer(small(), ArrayData(waves()), config).fit(progress=False)
    first, last = history[0]["pixel"], np.mean([h["pixel"] for h in history[-10:]])
    assert last < 0.5 * first


def finetune_trainer(purifier, data, attack_target="classifier") -> IMPureTrainer:
    config = TrainConfig(stage="finetune", steps=4, batch_size=2, lr=1e-3, warmup_steps=2, attack_steps=2,
                         checkpoint_every=2, attack_target=attack_target)
    clf = classifier()
    return IMPureTrainer(purifier, data, config, classifier=clf, perceptual=FeatureLoss(clf, {"": 1.0, "2": 0.5}))


@pytest.mark.parametrize("attack_target", ["classifier", "defence"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, attack_target):
    data = ArrayData(waves(6), torch.tensor([0, 1, 2, -1, 0, 1]))
    straight = finetune_trainer(small(), data, attack_target)
    history = straight.fit(progress=False)
    assert set(history[0]) == {"pixel", "perceptual"}

    finetune_trainer(small(), data, attack_target).fit(tmp_path, stop=2, progress=False)
    resumed = finetune_trainer(small(seed=5), data, attack_target)
    resumed.load(tmp_path)
    assert resumed.step == 2
    assert resumed.fit(progress=False) == history[2:]
    expected = straight.purifier.state_dict()
    for name, weight in resumed.purifier.state_dict().items():
        assert torch.equal(weight, expected[name]), name
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["stage"] == "finetune"
    IMPurify.from_pretrained(tmp_path)  # strict
    other = finetune_trainer(small(), data, attack_target)
    other.perceptual = FeatureLoss(other.classifier, {"": 1.0})  # another perceptual loss: refused, not mixed in
    with pytest.raises(ValueError, match="perceptual: .*in the checkpoint"):
        other.load(tmp_path)


def test_config_refuses_unknown_settings():
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig(stage="fine-tune")
    with pytest.raises(ValueError, match="attack_target must be one of"):
        TrainConfig(attack_target="purifier")
    with pytest.raises(ValueError, match="adv_fraction"):
        TrainConfig(adv_fraction=1.5)


def test_finetune_needs_a_classifier_or_labels():
    with pytest.raises(ValueError, match="classifier or an attack"):
        IMPureTrainer(small(), ArrayData(waves()), TrainConfig(stage="finetune", batch_size=2))
    trainer = IMPureTrainer(small(), ArrayData(waves()), TrainConfig(stage="finetune", batch_size=2),
                            attack=lambda x, y, g: x)
    with pytest.raises(ValueError, match="no labels"):
        trainer.fit(progress=False, stop=1)


def test_pgd_stays_in_budget_and_raises_the_loss():
    clf, x, y = classifier(), waves(), torch.tensor([0, 1, 2, 0])
    adv = pgd_attack(clf, x, y, gen(), eps=0.05, steps=5)
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    loss = nn.functional.cross_entropy
    assert loss(clf(adv), y) > loss(clf(x), y)


class Inverted(Purifier):
    """``1 - x``: a purifier whose input gradient is the classifier's, negated."""

    def _purify(self, x, generator):
        return 1 - x


def test_pgd_through_the_purifier_attacks_the_defence_not_the_bare_classifier():
    clf, x, y = classifier(), waves(), torch.tensor([0, 1, 2, 0])
    purifier = Inverted()

    def loss(images):
        return nn.functional.cross_entropy(clf(purifier(images)), y).item()
    adaptive = pgd_attack(clf, x, y, gen(), eps=0.05, steps=5, purifier=purifier)
    transfer = pgd_attack(clf, x, y, gen(), eps=0.05, steps=5)
    assert (adaptive - x).abs().max() <= 0.05 + 1e-6
    assert loss(transfer) < loss(x) < loss(adaptive)
    with pytest.raises(ValueError, match="attack_target"):
        TrainConfig(attack_target="purifier")


def test_defence_attack_draws_the_purifier_noise_from_the_step_generator():
    clf, x, y = classifier(), waves(), torch.tensor([0, 1, 2, 0])
    purifier = small()
    first = pgd_attack(clf, x, y, gen(3), eps=0.05, steps=2, purifier=purifier)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(first, pgd_attack(clf, x, y, gen(3), eps=0.05, steps=2, purifier=purifier))
    assert not torch.equal(first, pgd_attack(clf, x, y, gen(4), eps=0.05, steps=2, purifier=purifier))


def test_patch_mix_takes_a_fraction_of_whole_patches_from_the_input():
    x_in, pred = torch.zeros(64, 1, 16, 16), torch.ones(64, 1, 16, 16)
    mix = patch_mix(x_in, pred, 4, gen())
    assert ((mix == 0) | (mix == 1)).all()
    patches = mix.view(64, 4, 4, 4, 4)
    assert torch.equal(patches.amin((2, 4)), patches.amax((2, 4)))  # whole patches
    from_input = 1 - mix.mean((1, 2, 3))
    assert set(from_input.tolist()) == {8 / 16, 6 / 16, 4 / 16}  # ceil(16 / k), k = 2, 3, 4
    assert patch_mix(x_in[:2, :, :10, :7], pred[:2, :, :10, :7], 4, gen()).shape == (2, 1, 10, 7)


def test_lr_warms_up_then_decays():
    factors = [lr_factor(step, 10, 110) for step in range(110)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[10] == 1.0
    assert factors[60] == pytest.approx(0.5) and factors[-1] < 0.01
    assert TrainConfig(batch_size=512).learning_rate == pytest.approx(2e-4)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_data_sources(tmp_path):
    images = (np.arange(3 * 5 * 6) % 256).astype(np.uint8).reshape(3, 5, 6)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([2, 0, 1]))
    data = open_data(str(tmp_path / "t10k-images-idx3-ubyte"))
    image, label = data[2]
    assert image.shape == (1, 5, 6) and label == 1 and torch.equal(image[0], torch.tensor(images[2]) / 255)

    np.save(tmp_path / "x.npy", np.random.rand(4, 8, 8, 3).astype(np.float32))
    image, label = open_data(str(tmp_path / "x.npy"), image_size=6)[0]
    assert image.shape == (3, 6, 6) and label == -1
    assert to_images(np.zeros((2, 3, 4, 4), np.uint8)).shape == (2, 3, 4, 4)
    np.savez(tmp_path / "yx.npz", y=np.array([2, 0, 1]), x=images)  # named arrays, in any order: labels kept
    image, label = open_data(str(tmp_path / "yx.npz"))[2]
    assert image.shape == (1, 5, 6) and label == 1
    np.savez(tmp_path / "only.npz", images)
    assert open_data(str(tmp_path / "only.npz"))[0][1] == -1
    np.savez(tmp_path / "positional.npz", images, np.array([2, 0, 1]))  # np.savez(file, images, labels)
    assert open_data(str(tmp_path / "positional.npz"))[2][1] == 1
    assert to_images(np.ones((1, 2, 2), bool)).max() == 1

    for name, mode in [("cat/a.png", "RGBA"), ("dog/b.png", "RGB"), ("c.png", "RGB")]:
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new(mode, (7, 9), "white").save(tmp_path / "folder" / name)
    folder = open_data(str(tmp_path / "folder"), image_size=4)
    assert isinstance(folder, ImageFolderData)
    assert {f.name: folder[i][1] for i, f in enumerate(folder.files)} == {"a.png": 0, "b.png": 1, "c.png": -1}
    assert all(image.shape == (3, 4, 4) and image.min() > 0.99 for image, _ in folder)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, labels in (("train", [2, 0, 1]), ("t10k", [7, 8, 9])):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.array(labels))
    image, label = open_data(f"torchvision:FashionMNIST:{tmp_path}")[0]
    assert image.shape == (1, 5, 6) and label == 2 and image.dtype == torch.float32
    from purifytf.evaluation import load_dataset  # evaluation: the test split unless another is named

    assert [load_dataset(f"torchvision:FashionMNIST:{tmp_path}{split}")[0][1] for split in ("", ":test", ":train")] == [
        7, 7, 2]
    with pytest.raises(ValueError, match="a train and a test split, not 'val'"):
        load_dataset(f"torchvision:FashionMNIST:{tmp_path}:val")
    with pytest.raises(FileNotFoundError):
        open_data(str(tmp_path / "missing"))


def test_command_line_trains_and_resumes(tmp_path):
    np.save(tmp_path / "x.npy", (waves(4).numpy() * 255).astype(np.uint8))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    common = ["impure", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"), "--batch-size", "2",
              "--no-progress", "--warmup-steps", "1"]
    assert cli.run(parser.parse_args([*common, "--steps", "1"])) == 0
    assert cli.run(parser.parse_args([*common, "--steps", "2", "--resume"])) == 0
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["step"] == 2
    purifier = IMPurify.from_pretrained(tmp_path / "run")
    assert purifier.in_channels == 1 and purifier.network.config.embed_dim == 128
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())  # both sittings, summed
    assert [s["steps"] for s in record["sittings"]] == [[0, 1], [1, 2]] and record["steps"] == 2
    assert record["seed"] == 0 and record["device"] == "cpu" and record["stage"] == "pretrain"
    assert record["seconds"] == round(sum(s["seconds"] for s in record["sittings"]), 1)
