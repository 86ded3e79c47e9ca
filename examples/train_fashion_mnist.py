"""Recipe of the embedded Fashion-MNIST default: trains every bundled model and writes the package assets.

Needs the Debian package ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist) or
``--data DIR`` holding the same four files. Parts run in order; each writes ``<out>/<part>/`` and
``<out>/<part>/metrics.json`` (seed, seconds, machine, metrics). Reproduce the shipped assets with::

    python examples/train_fashion_mnist.py --part all

Parts: ``slice`` (1,000 test images), ``classifier`` (SmallCNN), ``ddpm`` (UNet backbone),
``impure`` (IMPurify tiny, both stages), ``ssni`` (score-norm statistics of clean training images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from purifytf import DiffPurify, IMPurify, SSNIPurify
from purifytf.hub import ASSETS, load_backbone_dir, untrained_backbone
from purifytf.models import SmallCNN
from purifytf.train.classifier import ClassifierTrainer, accuracy
from purifytf.train.data import ArrayData, read_idx, to_images
from purifytf.train.ddpm import DDPMTrainer, denoising_psnr
from purifytf.train.impure import FeatureLoss, IMPureTrainer, TrainConfig
from purifytf.train.loop import OptimConfig

PARTS = ("slice", "classifier", "ddpm", "impure", "ssni")
SLICE_SIZE = 1000


def fashion_mnist(root: Path, split: str) -> ArrayData:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return ArrayData(to_images(images), labels.astype(np.int64))


def record(directory: Path, seed: int, seconds: float, **metrics) -> None:
    info = {"seed": seed, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "device": "cuda" if torch.cuda.is_available() else "cpu", **metrics}
    (directory / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    print(directory.name, json.dumps(info))


def train_slice(args, out: Path) -> None:
    """The first 1,000 test images, uint8, with labels (MIT licence, Zalando Research)."""
    images = read_idx(args.data / "t10k-images-idx3-ubyte.gz")[:SLICE_SIZE]
    labels = read_idx(args.data / "t10k-labels-idx1-ubyte.gz")[:SLICE_SIZE]
    np.savez_compressed(out / "test-slice.npz", images=images, labels=labels)


def train_classifier(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    model = SmallCNN(in_channels=1, num_classes=10).to(args.device)
    config = OptimConfig(steps=args.classifier_steps, batch_size=128, lr=2e-3, warmup_steps=100,
                         weight_decay=0.05, betas=(0.9, 0.999), seed=args.seed, checkpoint_every=10**9)
    start = time.perf_counter()
    ClassifierTrainer(model, fashion_mnist(args.data, "train"), config).fit(out / "classifier")
    seconds = time.perf_counter() - start
    (out / "classifier" / "training_state.pt").unlink()
    record(out / "classifier", args.seed, seconds, steps=config.steps, batch_size=config.batch_size,
           test_accuracy=accuracy(model, fashion_mnist(args.data, "test")))


def train_ddpm(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    backbone = untrained_backbone("fashion-mnist").to(args.device)
    config = OptimConfig(steps=args.ddpm_steps, batch_size=128, lr=1e-3, warmup_steps=200, weight_decay=0.0,
                         betas=(0.9, 0.999), seed=args.seed, checkpoint_every=500)
    trainer = DDPMTrainer(backbone, fashion_mnist(args.data, "train"), config, ema_decay=0.999)
    if args.resume and (out / "ddpm" / "training_state.pt").exists():
        trainer.load(out / "ddpm")
    start = time.perf_counter()
    trainer.fit(out / "ddpm")
    seconds = time.perf_counter() - start
    test = fashion_mnist(args.data, "test").images
    psnr = {f"psnr_t{t}": round(denoising_psnr(trainer.model, test, t, torch.Generator().manual_seed(t)), 2)
            for t in (100, 200, 400, 600)}
    (out / "ddpm" / "training_state.pt").unlink()
    record(out / "ddpm", args.seed, seconds, steps=config.steps, batch_size=config.batch_size, **psnr)


def train_impure(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    data = fashion_mnist(args.data, "train")
    purifier = IMPurify(preset="tiny", in_channels=1).to(args.device)
    classifier = SmallCNN.from_pretrained(out / "classifier").to(args.device).eval()
    seconds = 0.0
    perceptual = FeatureLoss(classifier, {"": args.impure_perceptual_weight})  # L1 on the classifier's logits
    stages = (("pretrain", args.impure_pretrain_steps, None), ("finetune", args.impure_finetune_steps, perceptual))
    for stage, steps, perceptual in stages:
        config = TrainConfig(stage=stage, steps=steps, batch_size=64, lr=1e-3, warmup_steps=min(100, steps // 10),
                             seed=args.seed, checkpoint_every=10**9, attack_eps=8 / 255, attack_steps=5)
        trainer = IMPureTrainer(purifier, data, config, classifier=classifier, perceptual=perceptual)
        start = time.perf_counter()
        trainer.fit(out / "impure")
        seconds += time.perf_counter() - start
    (out / "impure" / "training_state.pt").unlink()
    record_impure(args, out, seconds)


def record_impure(args, out: Path, seconds: float) -> None:
    """IMPurify's metrics: the classifier's clean test accuracy after purification."""
    purifier = IMPurify.from_pretrained(out / "impure").to(args.device)
    classifier = SmallCNN.from_pretrained(out / "classifier").to(args.device).eval()
    test = fashion_mnist(args.data, "test")
    generator = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        purified = torch.cat([purifier.purify(x.to(args.device), generator).cpu() for x in test.images.split(500)])
    record(out / "impure", args.seed, seconds, pretrain_steps=args.impure_pretrain_steps,
           finetune_steps=args.impure_finetune_steps, perceptual_weight=args.impure_perceptual_weight, batch_size=64,
           clean_accuracy_after_purification=accuracy(classifier, ArrayData(purified, test.labels)))


def train_ssni(args, out: Path) -> None:
    base = DiffPurify(load_backbone_dir(out / "ddpm"), t_star=0.1)
    ssni = SSNIPurify(base, seed=args.seed).to(args.device)
    images = fashion_mnist(args.data, "train").images[:args.ssni_images]
    start = time.perf_counter()
    stats = ssni.calibrate(images, batch_size=250, generator=torch.Generator().manual_seed(args.seed))
    (out / "ssni").mkdir(exist_ok=True)
    (out / "ssni" / "stats.json").write_text(json.dumps({"eps_steps": ssni.eps_steps, **stats}, indent=2) + "\n")
    record(out / "ssni", args.seed, time.perf_counter() - start, images=args.ssni_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], nargs="+", default=["all"])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=ASSETS / "fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue the ddpm part from its checkpoint")
    parser.add_argument("--classifier-steps", type=int, default=2400)
    parser.add_argument("--ddpm-steps", type=int, default=4000)
    parser.add_argument("--impure-pretrain-steps", type=int, default=1400)
    parser.add_argument("--impure-finetune-steps", type=int, default=150)
    parser.add_argument("--impure-perceptual-weight", type=float, default=0.05)
    parser.add_argument("--ssni-images", type=int, default=2000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = {"slice": train_slice, "classifier": train_classifier, "ddpm": train_ddpm, "impure": train_impure,
               "ssni": train_ssni}
    for part in PARTS if "all" in args.part else args.part:
        recipes[part](args, args.out)


if __name__ == "__main__":
    main()
