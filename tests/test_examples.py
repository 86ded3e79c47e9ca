"""The examples run as documented (they are the README's promises)."""

import gzip
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
RECIPE = EXAMPLES[0].parent / "train_fashion_mnist.py"


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p != RECIPE], ids=lambda p: p.name)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_nfe_table_matches_the_defaults(capsys):
    runpy.run_path(str(EXAMPLES[0].parent / "nfe_per_purifier.py"), run_name="__main__")
    rows = dict(line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[2:])
    assert rows["DiffPurify (t*=0.1, DDPM)"] == "100" and rows["IMPurify (tiny)"] == "1"
    assert rows["SaliencyDiffPurify (spacing 20)"] == "10" and rows["SSNIPurify (on DiffPurify, T'=20)"] == "120"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(folder: Path) -> None:
    """Random images in the four IDX files of Fashion-MNIST: 128 training and 1,000 test images."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 128), ("t10k", 1000)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_zoo_recipe_runs_every_part(tmp_path, monkeypatch):
    """The recipe of the shipped models, in miniature: every part trains, saves and records itself."""
    write_fake_fashion_mnist(tmp_path)
    out = tmp_path / "zoo"
    argv = ["train_fashion_mnist.py", "--data", str(tmp_path), "--out", str(out), "--classifier-steps", "2",
            "--ddpm-steps", "2", "--impure-pretrain-steps", "2", "--impure-finetune-steps", "1",
            "--heldout-steps", "2", "--heldout-cache", str(tmp_path / "heldout"), "--metric-images", "4",
            "--ssni-images", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(RECIPE), run_name="__main__")
    with np.load(out / "test-slice.npz") as arrays:
        assert arrays["images"].shape == (1000, 28, 28) and arrays["labels"].shape == (1000,)
    for part in ("classifier", "ddpm", "impure", "ssni"):
        recorded = json.loads((out / part / "metrics.json").read_text())
        assert recorded["seed"] == 0 and recorded["seconds"] >= 0, part
        assert not (out / part / "training_state.pt").exists()
    ddpm = json.loads((out / "ddpm" / "metrics.json").read_text())
    assert {"psnr_t100", "psnr_t200", "diffpure_classifier_accuracy_after_purification"} <= set(ddpm)
    assert ddpm["diffpure_test_images"] == 4 and ddpm["max_t"] == 400 and len(ddpm["sittings"]) == 1
    stats = json.loads((out / "ssni" / "stats.json").read_text())
    assert stats["count"] == 8 and stats["eps_steps"] == 20
    trained = json.loads((out / "impure" / "metrics.json").read_text())
    weights = (out / "impure" / "model.safetensors").read_bytes()

    # --impure-set-noise: the same weights with other inference noise, re-measured; the training record stays.
    monkeypatch.setattr(sys, "argv", argv + ["--part", "impure", "--impure-set-noise", "--impure-image-t", "0.3",
                                             "--impure-feature-t", "0.4"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    config = json.loads((out / "impure" / "config.json").read_text())
    recorded = json.loads((out / "impure" / "metrics.json").read_text())
    assert (config["image_t"], config["feature_t"]) == (recorded["image_t"], recorded["feature_t"]) == (0.3, 0.4)
    assert (out / "impure" / "model.safetensors").read_bytes() == weights
    assert {k: recorded[k] for k in ("seconds", "sittings", "pretrain_steps")} == {
        k: trained[k] for k in ("seconds", "sittings", "pretrain_steps")}
    assert recorded["psnr"] != trained["psnr"]

    # --ddpm-remeasure: DiffPurify re-measured on the same weights (here on fewer images); the training record stays.
    weights = (out / "ddpm" / "model.safetensors").read_bytes()
    monkeypatch.setattr(sys, "argv", argv + ["--metric-images", "6", "--part", "ddpm", "--ddpm-remeasure"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    remeasured = json.loads((out / "ddpm" / "metrics.json").read_text())
    assert (out / "ddpm" / "model.safetensors").read_bytes() == weights
    assert remeasured.keys() == ddpm.keys() and remeasured["diffpure_test_images"] == 6
    assert {k: v for k, v in remeasured.items() if not k.startswith("diffpure_")} == {
        k: v for k, v in ddpm.items() if not k.startswith("diffpure_")}


def test_ddpm_recipe_options(tmp_path, monkeypatch):
    """--ddpm-widths/--ddpm-blocks change the architecture, --ddpm-seconds sets the horizon from the warm-up's speed,
    --ddpm-init starts from earlier weights (with lr 0 the export is exactly those weights)."""
    import safetensors.torch

    write_fake_fashion_mnist(tmp_path)
    common = ["train_fashion_mnist.py", "--data", str(tmp_path), "--classifier-steps", "2", "--heldout-steps", "2",
              "--heldout-cache", str(tmp_path / "heldout"), "--metric-images", "4", "--ddpm-widths", "8", "16", "16",
              "--ddpm-blocks", "1", "--ddpm-batch-size", "16", "--ddpm-warmup", "8"]
    first = tmp_path / "first"
    monkeypatch.setattr(sys, "argv", common + ["--out", str(first), "--part", "slice", "classifier", "ddpm",
                                               "--ddpm-seconds", "0.01"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    config = json.loads((first / "ddpm" / "config.json").read_text())["unet"]
    assert config["block_out_channels"] == [8, 16, 16] and config["layers_per_block"] == 1
    recorded = json.loads((first / "ddpm" / "metrics.json").read_text())
    assert recorded["planned_steps"] == recorded["steps"] > 7 and recorded["batch_size"] == 16
    assert recorded["sittings"][0]["note"] == "speed probe" and recorded["sittings"][0]["steps"] == [0, 7]

    second = tmp_path / "second"
    second.mkdir()
    for part in ("classifier", "test-slice.npz"):
        (second / part).symlink_to(first / part)
    monkeypatch.setattr(sys, "argv", common + ["--out", str(second), "--part", "ddpm", "--ddpm-steps", "3",
                                               "--ddpm-lr", "0", "--ddpm-init", str(first / "ddpm")])
    runpy.run_path(str(RECIPE), run_name="__main__")
    start, end = (safetensors.torch.load_file(d / "ddpm" / "model.safetensors") for d in (first, second))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    assert json.loads((second / "ddpm" / "metrics.json").read_text())["init"] == str(first / "ddpm")


def test_impure_recipe_options(tmp_path, monkeypatch):
    """--impure-architecture replaces fields of the tiny preset (patch size 2: a 14 x 14 grid), --impure-batch-size
    the batch, --impure-attack-steps fine-tuning's PGD; all are saved (config.json, metrics.json) and the weights
    load back; a malformed field is refused."""
    from purifytf import IMPurify

    write_fake_fashion_mnist(tmp_path)
    out = tmp_path / "zoo"
    argv = ["train_fashion_mnist.py", "--data", str(tmp_path), "--out", str(out), "--classifier-steps", "2",
            "--heldout-steps", "2", "--heldout-cache", str(tmp_path / "heldout"), "--metric-images", "4",
            "--impure-pretrain-steps", "2", "--impure-finetune-steps", "1", "--impure-batch-size", "8",
            "--impure-attack-steps", "2"]
    monkeypatch.setattr(sys, "argv", argv + ["--part", "slice", "classifier", "impure", "--impure-architecture",
                                             "patch_size=2", "depth=3", "fuse_indices=[0,1]"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    recorded = json.loads((out / "impure" / "metrics.json").read_text())
    assert recorded["batch_size"] == 8 and recorded["attack_steps"] == 2 and recorded["device"] == "cpu"
    assert recorded["overrides"]["patch_size"] == 2 and recorded["overrides"]["fuse_indices"] == [0, 1]
    network = IMPurify.from_pretrained(out / "impure").network
    assert (network.config.patch_size, network.config.depth, network.config.fuse_indices) == (2, 3, (0, 1))
    assert network.grid(28, 28) == (14, 14)

    monkeypatch.setattr(sys, "argv", argv + ["--part", "impure", "--impure-architecture", "patch_size:2"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(RECIPE), run_name="__main__")

    # --impure-export re-exports the kept checkpoint with the training record of its sittings
    kept = ["--part", "impure", "--impure-checkpoints", str(tmp_path / "ckpt")]
    monkeypatch.setattr(sys, "argv", argv + kept)
    runpy.run_path(str(RECIPE), run_name="__main__")
    trained = json.loads((out / "impure" / "metrics.json").read_text())
    monkeypatch.setattr(sys, "argv", argv + kept + ["--impure-export"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    exported = json.loads((out / "impure" / "metrics.json").read_text())
    assert exported["sittings"] == trained["sittings"] and len(trained["sittings"]) == 2
    assert exported["seconds"] == trained["seconds"] > 0

    # --impure-init into a deeper --impure-architecture: the saved weights plus identity blocks (lr 0: unchanged)
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    for part in ("classifier", "test-slice.npz"):
        (deeper / part).symlink_to(out / part)
    monkeypatch.setattr(sys, "argv", [a if a != str(out) else str(deeper) for a in argv] + [
        "--part", "impure", "--impure-init", str(out / "impure"), "--impure-lr", "0", "--impure-finetune-steps", "0",
        "--impure-architecture", "depth=5", "decoder_depth=3"])
    runpy.run_path(str(RECIPE), run_name="__main__")
    saved, grown = (IMPurify.from_pretrained(d / "impure", seed=0) for d in (out, deeper))
    assert (grown.network.config.depth, grown.network.config.decoder_depth) == (5, 3)
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(grown(images), saved(images))
