"""``purifytf train impure ...``: the two IMPure training stages from the command line.

Stage 1 (masked reconstruction on clean images)::

    purifytf train impure --data train-images-idx3-ubyte --out runs/stage1 --stage pretrain \\
        --preset tiny --steps 20000 --batch-size 64

Stage 2 (fine-tuning on PGD examples against a classifier, perceptual loss on its logits)::

    purifytf train impure --data train-images-idx3-ubyte --out runs/stage2 --stage finetune \\
        --init runs/stage1 --classifier timm:resnet18 --classifier-weights clf.safetensors --num-classes 10

``--resume`` continues from the checkpoint in ``--out``. The output directory loads with
``IMPurify.from_pretrained(out)``; its ``metrics.json`` records the seed, steps, seconds, threads, device and
machine of every sitting, up to its last checkpoint (:mod:`purifytf.train.record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from ..classifiers import load_classifier
from ..data import open_data
from ..models.mae import MAE_PRESETS
from ..purifiers.impure import IMPurify
from .impure import ATTACK_TARGETS, STAGES, FeatureLoss, IMPureTrainer, TrainConfig, vgg19_bn_feature_loss
from .loop import STATE_FILE
from .record import device_name, fit_sitting, machine, read_sittings

__all__ = ["add_arguments", "run"]

_DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipes = parser.add_subparsers(dest="recipe", required=True)
    p = recipes.add_parser("impure", help="train IMPurify's reconstruction network (IMPure)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="image folder, .npy/.npz/IDX file, or torchvision:NAME:ROOT (e.g. torchvision:CIFAR10:data)")
    data.add_argument("--labels", help="label array for --data (.npy/.npz/IDX; IDX *-labels-* siblings are found)")
    data.add_argument("--image-size", type=int, help="resize (short side) and centre-crop to this size")
    data.add_argument("--workers", type=int, default=0, help="data-loading processes")

    model = p.add_argument_group("model and checkpoints")
    model.add_argument("--out", required=True, type=Path, help="checkpoint directory")
    model.add_argument("--preset", default="tiny", choices=sorted(MAE_PRESETS))
    model.add_argument("--channels", type=int, help="image channels (default: those of the data)")
    model.add_argument("--init", type=Path, help="start from this IMPurify checkpoint (e.g. the stage-1 output)")
    model.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--stage", default=_DEFAULTS.stage, choices=STAGES)
    for name in ("steps", "batch_size", "warmup_steps", "seed", "checkpoint_every"):
        opt.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(_DEFAULTS, name))
    opt.add_argument("--lr", type=float, help="learning rate (default: base-lr * batch-size / 256)")
    for name in ("base_lr", "weight_decay"):
        opt.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(_DEFAULTS, name))

    adv = p.add_argument_group("fine-tuning (stage 2)")
    adv.add_argument("--classifier",
                     help="timm:NAME, torchvision:NAME, purifytf:NAME or MODULE:FACTORY (as in purifytf eval)")
    adv.add_argument("--classifier-weights", type=Path, help="state dict (.safetensors or torch.save)")
    adv.add_argument("--num-classes", type=int, default=1000, help="classes of a timm/torchvision classifier")
    adv.add_argument("--classifier-mean", type=float, nargs="+", help="normalisation the classifier expects")
    adv.add_argument("--classifier-std", type=float, nargs="+")
    adv.add_argument("--adv-fraction", type=float, default=_DEFAULTS.adv_fraction,
                     help="share of adversarial inputs per batch")
    adv.add_argument("--attack-eps", type=float, default=_DEFAULTS.attack_eps, help="PGD L-inf budget")
    adv.add_argument("--attack-steps", type=int, default=_DEFAULTS.attack_steps)
    adv.add_argument("--attack-target", default=_DEFAULTS.attack_target, choices=ATTACK_TARGETS,
                     help="PGD on the bare classifier (the paper's) or through the purifier being trained (adaptive)")
    adv.add_argument("--perceptual", default="classifier", choices=["classifier", "vgg19_bn", "none"],
                     help="perceptual network: the classifier's features, VGG19-BN (RGB, needs its weights), none")
    adv.add_argument("--perceptual-layers", default="=1",
                     help="classifier layers as NAME=WEIGHT,... ('' names the output logits; default '=1')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def classifier_of(args: argparse.Namespace, channels: int) -> nn.Module:
    """The target classifier of ``--classifier`` (:func:`~purifytf.classifiers.load_classifier`), on [0, 1] images."""
    source, sep, _ = args.classifier.partition(":")
    named = not sep or source in ("timm", "torchvision")
    model = load_classifier(args.classifier, args.classifier_weights,
                            **({"num_classes": args.num_classes, "in_channels": channels} if named else {}))
    if args.classifier_mean is not None:
        model = nn.Sequential(v2.Normalize(args.classifier_mean, args.classifier_std), model)
    return model.eval()


def parse_layers(text: str) -> dict[str, float]:
    """``"name=w,name=w"`` -> ``{name: w}``."""
    pairs = (item.rpartition("=") for item in text.split(","))
    return {name.strip(): float(weight) for name, _, weight in pairs}


def _purifier(args: argparse.Namespace, channels: int) -> IMPurify:
    if args.resume and (args.out / STATE_FILE).exists():
        return IMPurify.from_pretrained(args.out)
    if args.init is not None:
        return IMPurify.from_pretrained(args.init)
    return IMPurify(preset=args.preset, in_channels=channels)


def run(args: argparse.Namespace) -> int:
    data = open_data(args.data, args.image_size, args.labels)
    channels = args.channels or data[0][0].shape[0]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, num_workers=args.workers)
    purifier = _purifier(args, channels).to(args.device)
    classifier = perceptual = None
    if args.classifier:
        classifier = classifier_of(args, purifier.in_channels).to(args.device)
    if config.stage == "finetune" and args.perceptual == "vgg19_bn":
        perceptual = vgg19_bn_feature_loss().to(args.device)
    elif config.stage == "finetune" and args.perceptual == "classifier" and classifier is not None:
        perceptual = FeatureLoss(classifier, parse_layers(args.perceptual_layers))
    trainer = IMPureTrainer(purifier, data, config, classifier=classifier, perceptual=perceptual)
    if args.resume and (args.out / STATE_FILE).exists():
        trainer.load(args.out)
        print(f"resumed from {args.out} at step {trainer.step}")
    log = args.out / "sittings.json"
    sittings = read_sittings(log, args.resume)
    fit_sitting(trainer, args.out, config.steps, log, sittings, args.device, progress=not args.no_progress,
                stage=config.stage)
    metrics = {"seed": config.seed, "stage": config.stage, "steps": trainer.step,
               "seconds": round(sum(s["seconds"] for s in sittings), 1), "device": device_name(args.device),
               "machine": machine(), "sittings": sittings}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out} (IMPurify.from_pretrained({str(args.out)!r}))")
    return 0
