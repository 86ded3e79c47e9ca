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
import copy
import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from purifytf import DiffPurify, IMPurify, SSNIPurify
from purifytf.data import ArrayData, fashion_mnist, read_idx, to_images
from purifytf.diffusion.backbones import build_backbone
from purifytf.evaluation.clean import accuracy, purification_metrics
from purifytf.hub import ASSETS, backbone_config, load_backbone_dir
from purifytf.models import SmallCNN, load_deepened
from purifytf.train.classifier import ClassifierTrainer, heldout_cache, train_heldout_classifier
from purifytf.train.ddpm import DDPMTrainer, denoising_psnr
from purifytf.train.impure import ATTACK_TARGETS, FeatureLoss, IMPureTrainer, TrainConfig
from purifytf.train.loop import STATE_FILE, OptimConfig
from purifytf.train.record import device_name, fit_sitting, machine, read_sittings, sitting

PARTS = ("slice", "classifier", "ddpm", "impure", "ssni")
SLICE_SIZE = 1000


def record(directory: Path, args, seconds: float, **metrics) -> None:
    """``metrics.json``: seed, seconds, CPU threads, machine and the device that trained."""
    write_metrics(directory, {"seed": args.seed, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                              "machine": machine(),
                              "device": device_name(args.device), **metrics})


def write_metrics(directory: Path, info: dict) -> None:
    (directory / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    print(directory.name, json.dumps(info))


def update_metrics(directory: Path, **changes) -> None:
    """Replace some entries of ``metrics.json``, keeping the rest (the training record)."""
    write_metrics(directory, {**json.loads((directory / "metrics.json").read_text()), **changes})


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
    record(out / "classifier", args, seconds, steps=config.steps, batch_size=config.batch_size,
           test_accuracy=accuracy(model, fashion_mnist(args.data, "test")))


def ddpm_architecture(args) -> dict:
    """The shipped UNet config, with --ddpm-widths / --ddpm-blocks (if given) replacing its widths and depth."""
    config = copy.deepcopy(backbone_config("fashion-mnist"))
    if args.ddpm_widths:
        config["unet"]["block_out_channels"] = list(args.ddpm_widths)
    if args.ddpm_blocks:
        config["unet"]["layers_per_block"] = args.ddpm_blocks
    return config


def horizon_from_speed(trainer, seconds: float, probe: int) -> int:
    """Steps that fit in ``seconds`` at the speed of ``probe`` warm-up steps (the first few, slower, not timed).

    Runs inside the warm-up, whose learning rate does not depend on the horizon, so a later run given the
    returned number as ``--ddpm-steps`` repeats this one."""
    if probe >= trainer.config.warmup_steps:
        raise ValueError(f"the speed probe ({probe} steps) must end inside the warm-up ({trainer.config.warmup_steps})")
    trainer.fit(stop=probe // 4, progress=False)  # each step reads its loss back, so the clock sees finished work
    start = time.perf_counter()
    trainer.fit(stop=probe, progress=False)
    rate = (probe - probe // 4) / (time.perf_counter() - start)
    return max(probe + 1, int(seconds * rate))


def train_ddpm(args, out: Path) -> None:
    """Trains on t in [1, --ddpm-max-t] (uniform, or towards small t with --ddpm-t-power) towards --ddpm-steps (the
    cosine horizon; or as many as fit in --ddpm-seconds), possibly over several sittings: --stop ends a sitting early,
    --checkpoints keeps the resumable state outside the package, and every sitting exports the EMA weights with their
    metrics (wall time and steps summed over the sittings; PSNR on the full test set; DiffPurify's effect on two
    classifiers' clean accuracy). --ddpm-init starts the network and its EMA from earlier weights. --ddpm-remeasure
    only re-measures DiffPurify on the exported weights (after a sampler change), keeping the training record."""
    if args.ddpm_remeasure:
        update_metrics(out / "ddpm", **diffpure_metrics(args, out))
        return
    torch.manual_seed(args.seed)
    backbone = build_backbone(ddpm_architecture(args)).to(args.device)
    if args.ddpm_init:
        safetensors.torch.load_model(backbone, args.ddpm_init / "model.safetensors", strict=True,
                                     device=str(args.device))
    config = OptimConfig(steps=args.ddpm_steps, batch_size=args.ddpm_batch_size, lr=args.ddpm_lr,
                         warmup_steps=args.ddpm_warmup, weight_decay=0.0, betas=(0.9, 0.999), seed=args.seed,
                         checkpoint_every=250)
    trainer = DDPMTrainer(backbone, fashion_mnist(args.data, "train"), config, ema_decay=args.ddpm_ema,
                          max_t=args.ddpm_max_t, t_power=args.ddpm_t_power)
    work = args.checkpoints or out / "ddpm"
    if args.resume and (work / STATE_FILE).exists():
        trainer.load(work, adopt=("steps",) if args.ddpm_seconds else ())  # the horizon its speed probe measured
    sittings = read_sittings(work / "sittings.json", args.resume)
    if args.ddpm_seconds and trainer.step == 0:
        start = time.perf_counter()
        config.steps = horizon_from_speed(trainer, args.ddpm_seconds, probe=min(100, config.warmup_steps - 1))
        sittings.append(sitting(trainer, 0, start, args.device, note="speed probe"))
    fit_sitting(trainer, work, min(args.stop or config.steps, config.steps), work / "sittings.json", sittings,
                args.device)
    if work != out / "ddpm":
        (out / "ddpm").mkdir(parents=True, exist_ok=True)
        trainer.save_model(out / "ddpm")
    elif trainer.step == config.steps:
        (work / STATE_FILE).unlink()
    test = fashion_mnist(args.data, "test").images
    psnr = {f"psnr_t{t}": round(denoising_psnr(trainer.model, test, t, torch.Generator().manual_seed(t)), 2)
            for t in (100, 200, 400) if t <= args.ddpm_max_t}
    purification = diffpure_metrics(args, out)
    record(out / "ddpm", args, sum(s["seconds"] for s in sittings), steps=trainer.step,
           planned_steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps,
           ema_decay=args.ddpm_ema, init=str(args.ddpm_init) if args.ddpm_init else None, max_t=args.ddpm_max_t,
           t_power=args.ddpm_t_power, parameters=sum(p.numel() for p in trainer.model.parameters()),
           sittings=sittings, **psnr, **purification)


def diffpure_metrics(args, out: Path) -> dict:
    """:func:`slice_metrics` of DiffPurify (t* = 0.1, its default steps and sampler) on the UNet in ``<out>/ddpm``,
    keys prefixed ``diffpure_``."""
    diffpure = DiffPurify(load_backbone_dir(out / "ddpm"), t_star=0.1).to(args.device)
    return {f"diffpure_{k}": v for k, v in slice_metrics(diffpure, args, out).items()}


def impure_overrides(args) -> dict:
    """The shipped network: the tiny preset with noise ranges for 28 x 28 images (see MODEL_CARD.md), and the
    :class:`~purifytf.models.MAEConfig` fields of ``--impure-architecture``."""
    return {**args.impure_architecture, "train_image_t": args.impure_train_image_t,
            "train_feature_t": args.impure_train_feature_t}


def field_value(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` with a JSON value (``patch_size=2``, ``fuse_indices=[0,2]``) -> ``(field, value)``."""
    field, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be JSON (a number or a list)") from None


def train_impure(args, out: Path) -> None:
    """Both stages (pixel-loss pre-training, then fine-tuning on PGD/clean pairs with a perceptual loss on the
    classifier's logits), resumable: each stage checkpoints to ``<checkpoints>/<stage>`` every 200 steps and
    ``--resume`` continues from there; ``--impure-export`` only exports the latest checkpoint (a partial run)."""
    if args.impure_set_noise:
        set_impure_noise(args, out)
        return
    torch.manual_seed(args.seed)
    data = fashion_mnist(args.data, "train")
    purifier = IMPurify(preset="tiny", in_channels=1, overrides=impure_overrides(args), image_t=args.impure_image_t,
                        feature_t=args.impure_feature_t).to(args.device)
    if args.impure_init:  # continue from earlier weights of the same widths (deeper: identity blocks added)
        saved = safetensors.torch.load_file(args.impure_init / "model.safetensors")
        load_deepened(purifier.network, {k.removeprefix("network."): v for k, v in saved.items()})
    classifier = SmallCNN.from_pretrained(out / "classifier").to(args.device).eval()
    work = args.impure_checkpoints or out / "impure-checkpoints"
    sittings = read_sittings(work / "sittings.json", args.resume or args.impure_export)
    perceptual = FeatureLoss(classifier, {"": args.impure_perceptual_weight})  # L1 on the classifier's logits
    done = {}
    for stage, steps, loss in (("pretrain", args.impure_pretrain_steps, None),
                               ("finetune", args.impure_finetune_steps, perceptual)):
        config = TrainConfig(stage=stage, steps=steps, batch_size=args.impure_batch_size, lr=args.impure_lr,
                             warmup_steps=min(100, steps // 10), seed=args.seed, checkpoint_every=200,
                             attack_eps=8 / 255, attack_steps=args.impure_attack_steps,
                             attack_target=args.impure_attack_target,
                             adv_fraction=args.impure_adv_fraction)
        trainer = IMPureTrainer(purifier, data, config, classifier=classifier, perceptual=loss)
        if (args.resume or args.impure_export) and (work / stage / STATE_FILE).exists():
            trainer.load(work / stage)
        if not args.impure_export and trainer.step < steps:
            fit_sitting(trainer, work / stage, steps, work / "sittings.json", sittings, args.device, stage=stage)
        done[f"{stage}_steps"] = trainer.step
        if trainer.step < steps:  # a partial run: export what there is
            break
    purifier.save_pretrained(out / "impure")
    record_impure(args, out, sum(s["seconds"] for s in sittings), sittings=sittings, **done,
                  init=str(args.impure_init) if args.impure_init else None, lr=args.impure_lr,
                  attack_target=args.impure_attack_target, attack_steps=args.impure_attack_steps,
                  adv_fraction=args.impure_adv_fraction, image_t=args.impure_image_t, feature_t=args.impure_feature_t,
                  overrides=impure_overrides(args))
    if args.impure_checkpoints is None and done.get("finetune_steps") == args.impure_finetune_steps:
        shutil.rmtree(work)


def set_impure_noise(args, out: Path) -> None:
    """Re-export the shipped IMPurify weights with the inference noise ``--impure-image-t`` / ``--impure-feature-t``
    (a per-dataset default, chosen by the study; training never uses it) and re-measure its :func:`slice_metrics`;
    the training record in ``metrics.json`` is kept."""
    purifier = IMPurify.from_pretrained(out / "impure", image_t=args.impure_image_t, feature_t=args.impure_feature_t)
    purifier.save_pretrained(out / "impure")
    update_metrics(out / "impure", image_t=args.impure_image_t, feature_t=args.impure_feature_t,
                   **slice_metrics(purifier.to(args.device), args, out))


def slice_metrics(purifier: nn.Module, args, out: Path) -> dict:
    """``purifier``'s :func:`~purifytf.evaluation.clean.purification_metrics` on the bundled test slice (seed 0),
    for the bundled classifier and the held-out classifier (another architecture, used nowhere in training:
    :func:`~purifytf.train.classifier.train_heldout_classifier`)."""
    heldout = train_heldout_classifier(functools.partial(fashion_mnist, args.data), args.heldout_steps, args.seed,
                                       args.heldout_cache or heldout_cache(args.heldout_steps, args.seed))
    classifiers = {"classifier": SmallCNN.from_pretrained(out / "classifier"), "heldout_classifier": heldout}
    with np.load(out / "test-slice.npz") as arrays:
        n = args.metric_images
        test = ArrayData(to_images(arrays["images"][:n]), arrays["labels"][:n].astype(np.int64))
    metrics = purification_metrics(purifier, test, {k: v.to(args.device) for k, v in classifiers.items()},
                                   torch.Generator(device=args.device).manual_seed(0))
    return {"test_images": len(test), "heldout_classifier": f"AllConvNet, {args.heldout_steps} steps", **metrics}


def record_impure(args, out: Path, seconds: float, **extra) -> None:
    """IMPurify's training record with its :func:`slice_metrics`."""
    metrics = slice_metrics(IMPurify.from_pretrained(out / "impure").to(args.device), args, out)
    record(out / "impure", args, seconds, **extra, perceptual_weight=args.impure_perceptual_weight,
           batch_size=args.impure_batch_size, **metrics)


def train_ssni(args, out: Path) -> None:
    base = DiffPurify(load_backbone_dir(out / "ddpm"), t_star=0.1)
    ssni = SSNIPurify(base, seed=args.seed).to(args.device)
    images = fashion_mnist(args.data, "train").images[:args.ssni_images]
    start = time.perf_counter()
    stats = ssni.calibrate(images, batch_size=250, generator=torch.Generator().manual_seed(args.seed))
    (out / "ssni").mkdir(exist_ok=True)
    (out / "ssni" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    record(out / "ssni", args, time.perf_counter() - start, images=args.ssni_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], nargs="+", default=["all"])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=ASSETS / "fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue ddpm and impure from their checkpoints")
    parser.add_argument("--checkpoints", type=Path, help="resumable ddpm state (default: <out>/ddpm)")
    parser.add_argument("--stop", type=int, help="end this ddpm sitting at this step (resume later with --resume)")
    parser.add_argument("--classifier-steps", type=int, default=2400)
    parser.add_argument("--ddpm-steps", type=int, default=12000, help="total steps (the cosine horizon)")
    parser.add_argument("--ddpm-seconds", type=float,
                        help="instead of --ddpm-steps: the horizon that fits this many seconds at the speed measured "
                             "in the warm-up (recorded as planned_steps; pass it as --ddpm-steps to repeat the run)")
    parser.add_argument("--ddpm-batch-size", type=int, default=128)
    parser.add_argument("--ddpm-lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--ddpm-warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--ddpm-ema", type=float, default=0.999, help="EMA decay per step of the saved weights")
    parser.add_argument("--ddpm-init", type=Path,
                        help="start from these backbone weights (a directory, same architecture)")
    parser.add_argument("--ddpm-widths", type=int, nargs="+", help="UNet widths per level (default: the shipped ones)")
    parser.add_argument("--ddpm-blocks", type=int, help="ResNet blocks per level (default: the shipped number)")
    parser.add_argument("--ddpm-max-t", type=int, default=400, help="largest training timestep (valid range)")
    parser.add_argument("--ddpm-t-power", type=float, default=1.0,
                        help="timestep distribution: t = 1 + floor(u ** P * max_t); 1 uniform, > 1 towards small t")
    parser.add_argument("--ddpm-remeasure", action="store_true",
                        help="only re-measure DiffPurify on the weights in <out>/ddpm (no training; metrics.json keeps "
                             "the training record)")
    parser.add_argument("--impure-pretrain-steps", type=int, default=500)
    parser.add_argument("--impure-finetune-steps", type=int, default=40)
    parser.add_argument("--impure-perceptual-weight", type=float, default=0.05)
    parser.add_argument("--impure-image-t", type=float, default=0.05,
                        help="inference image noise (fraction of T; the default: benchmarks/study.py's choice)")
    parser.add_argument("--impure-feature-t", type=float, default=0.1, help="inference feature noise (fraction of T)")
    parser.add_argument("--impure-train-image-t", type=float, nargs=2, default=[0.0, 0.3], help="training [lo, hi)")
    parser.add_argument("--impure-train-feature-t", type=float, nargs=2, default=[0.0, 0.6])
    parser.add_argument("--impure-lr", type=float, default=5e-4)
    parser.add_argument("--impure-attack-target", default=TrainConfig.attack_target, choices=ATTACK_TARGETS,
                        help="fine-tuning's PGD: on the bare classifier (the paper's) or through IMPurify (adaptive)")
    parser.add_argument("--impure-attack-steps", type=int, default=5, help="fine-tuning's PGD steps (Linf 8/255)")
    parser.add_argument("--impure-adv-fraction", type=float, default=TrainConfig.adv_fraction,
                        help="fine-tuning's share of PGD inputs")
    parser.add_argument("--impure-batch-size", type=int, default=64)
    parser.add_argument("--impure-architecture", type=field_value, nargs="+", default=[], metavar="FIELD=VALUE",
                        help="MAEConfig fields replacing the tiny preset's, e.g. patch_size=2 depth=6 (JSON values)")
    parser.add_argument("--impure-init", type=Path,
                        help="start from these IMPurify weights (a directory); with more blocks in "
                             "--impure-architecture (depth=, decoder_depth=) the added ones start as the identity")
    parser.add_argument("--impure-checkpoints", type=Path,
                        help="resumable impure state (default: <out>/impure-checkpoints, removed when done)")
    parser.add_argument("--impure-export", action="store_true", help="export the latest impure checkpoint, no training")
    parser.add_argument("--impure-set-noise", action="store_true",
                        help="only re-export the weights in <out>/impure with --impure-image-t/--impure-feature-t "
                             "and re-measure them (no training)")
    parser.add_argument("--heldout-steps", type=int, default=1500,
                        help="training steps of the held-out classifier (AllConvNet) that checks the purifiers")
    parser.add_argument("--heldout-cache", type=Path, help="its cache folder (default: ~/.cache/purifytf/heldout/...)")
    parser.add_argument("--metric-images", type=int, default=SLICE_SIZE,
                        help="test-slice images for the purification metrics (all by default)")
    parser.add_argument("--ssni-images", type=int, default=2000)
    args = parser.parse_args()
    args.impure_architecture = dict(args.impure_architecture)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = {"slice": train_slice, "classifier": train_classifier, "ddpm": train_ddpm, "impure": train_impure,
               "ssni": train_ssni}
    for part in PARTS if "all" in args.part else args.part:
        recipes[part](args, args.out)


if __name__ == "__main__":
    main()
