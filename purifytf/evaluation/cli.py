"""``purifytf eval``: robust accuracy of a purifier + classifier under adaptive attacks.

Example (DiffPure-style defence of a CIFAR-10 classifier, Lee & Kim's protocol)::

    purifytf eval --purifier runs/diffpure --purifier-class DiffPurify --checkpoint \\
        --classifier resnet18 --classifier-weights cifar_resnet18.safetensors --num-classes 10 \\
        --normalize 0.4914,0.4822,0.4465:0.2470,0.2435,0.2616 \\
        --dataset torchvision:CIFAR10:./data --num-images 512 --shuffle-seed 0 \\
        --attacks lee-kim --eps 8/255 --steps 200 --eot 20 --runs 10 --output results/diffpure

Images are attacked in batches of ``--batch-size`` (seed = ``--seed`` + the batch's first image
index). Scale out with ``torchrun --nproc_per_node N -m purifytf.evaluation.cli ...``: results do
not depend on N. Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import torch

from ..attacks import ATTACK_METHODS, ATTACK_VIEWS, PRESETS, AttackSettings, parse_attacks
from ..defended import DefendedModel
from .data import load_dataset
from .harness import default_device, distributed, evaluate, summary_markdown
from .loading import load_classifier, load_purifier, parse_options, unit_input_classifier
from .report import write_reports

__all__ = ["add_arguments", "dataset_name", "run", "main", "select_indices"]

_NOT_IN_CONFIG = ("command", "output", "num_images", "device", "progress", "checkpoint", "model_name",
                  "dataset_name")  # results independent of these


def _fraction(text: str) -> float:
    """``"8/255"`` or ``"0.03"`` -> float."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("defence")
    model.add_argument("--purifier", required=True,
                       help="'none', a name of purifytf.list_purifiers() (pretrained), a saved directory or Hub "
                            "repo id (a saved saliency purifier's classifier has --classifier's architecture), or "
                            "module:function")
    model.add_argument("--purifier-class", help="check that a saved directory holds this class, e.g. DiffPurify")
    model.add_argument("--purifier-option", action="append", metavar="KEY=VALUE",
                       help="constructor/loading argument of the purifier (JSON value), repeatable")
    model.add_argument("--checkpoint", action="store_true",
                       help="gradient checkpointing inside the purifier (attack 100-NFE purifiers within memory)")
    model.add_argument("--purifier-seed", type=int, help="deterministic defence: every purification uses this seed")
    model.add_argument("--classifier", required=True, help="timm model name or module:function")
    model.add_argument("--classifier-weights", help=".safetensors state dict of the classifier")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    model.add_argument("--num-classes", type=int, help="classes of a timm classifier")
    model.add_argument("--normalize", default="auto",
                       help="auto (timm pretrained_cfg; default), none, torchvision weights name, or MEAN,..:STD,..")
    model.add_argument("--runs", type=int, default=10, help="purifications per prediction (vote; default %(default)s)")
    model.add_argument("--vote", choices=("majority", "logits"), default="majority",
                       help="default %(default)s")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="npz:FILE, idx:IMAGES,LABELS, folder:DIR, torchvision:NAME:ROOT[:SPLIT] or bundled:NAME")
    data.add_argument("--image-size", type=int, help="resize + centre-crop folder/torchvision images")
    data.add_argument("--num-images", type=int, help="evaluate this many images (default: all)")
    data.add_argument("--shuffle-seed", type=int, help="pick a random subset with this seed (default: the first)")

    attack = parser.add_argument_group("attacks")
    presets = ", ".join(f"{name}={'+'.join(methods)}" for name, methods in PRESETS.items())
    attack.add_argument("--attacks", default="lee-kim",
                        help=f"comma list of METHOD[@{'|'.join(ATTACK_VIEWS)}]; methods {', '.join(ATTACK_METHODS)}; "
                             f"alias bpda-eot; presets {presets} (default %(default)s)")
    attack.add_argument("--eps", type=_fraction, default=8 / 255, help="Linf radius in [0, 1], e.g. 8/255 (default)")
    attack.add_argument("--step", type=_fraction, default=0.007, help="Linf step (default %(default)s)")
    attack.add_argument("--steps", type=int, default=200,
                        help="PGD-EOT and FGSM-family iterations (default %(default)s)")
    attack.add_argument("--apgd-steps", type=int, default=100,
                        help="APGD / AutoAttack iterations (default %(default)s)")
    attack.add_argument("--eot", type=int, default=20, help="EOT samples per PGD-EOT step (default %(default)s)")
    attack.add_argument("--eot-batch", type=int, help="EOT samples per backward pass (memory)")
    attack.add_argument("--eps-l2", type=_fraction, default=0.5, help="L2 radius (default %(default)s)")
    attack.add_argument("--step-l2", type=_fraction, help="default 2.5 * eps_l2 / steps")
    attack.add_argument("--no-random-start", dest="random_start", action="store_false")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--output", required=True, help="results directory (rerun to resume)")
    run_group.add_argument("--seed", type=int, default=0,
                           help="a batch runs with seed + its first image's index (default %(default)s)")
    run_group.add_argument("--batch-size", type=int, default=32,
                           help="images attacked together (results depend on it: it is part of the run's config; "
                                "default %(default)s)")
    run_group.add_argument("--device", help="default: cuda if available (torchrun: GPU LOCAL_RANK mod GPUs), else cpu")
    run_group.add_argument("--no-progress", dest="progress", action="store_false")
    report = parser.add_argument_group("reports (model_info.json, model_index.yaml)")
    report.add_argument("--model-name", help="name of the defence in the reports (default: PURIFIER + CLASSIFIER)")
    report.add_argument("--dataset-name", help="dataset name in the reports (default: from --dataset, e.g. cifar10)")


def select_indices(size: int, count: int | None, shuffle_seed: int | None) -> list[int]:
    """The dataset indices to evaluate: the first ``count``, or ``count`` drawn with ``shuffle_seed``."""
    if count is not None and not 1 <= count <= size:
        raise ValueError(f"--num-images must be in [1, {size}] for this dataset, got {count}")
    order = range(size) if shuffle_seed is None else torch.randperm(
        size, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    return list(order)[:count]


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device) if args.device else default_device()


def defended_model(args: argparse.Namespace, channels: int | None = None) -> DefendedModel:
    """The defence the command line describes (``channels``: the data's, for a classifier that does not say).

    A saliency purifier reads the classifier on [0, 1] images: with a ``--normalize`` that resolves to a mean and
    std it gets ``nn.Sequential(v2.Normalize(mean, std), classifier)`` (the same network), while the defended model
    normalises before the classifier itself; a saved saliency purifier must have been saved with such a classifier.
    """
    classifier = load_classifier(args.classifier, args.classifier_weights, args.pretrained, args.num_classes)
    reader, normalization = unit_input_classifier(classifier, args.normalize, channels)
    purifier = load_purifier(args.purifier, args.purifier_class, parse_options(args.purifier_option),
                             args.checkpoint, args.purifier_seed, reader)
    return DefendedModel(purifier, classifier, runs=args.runs, vote=args.vote, normalize=normalization)


def _evaluate(args: argparse.Namespace, device: torch.device) -> dict | None:
    settings = AttackSettings(eps=args.eps, step=args.step, steps=args.steps, apgd_steps=args.apgd_steps, eot=args.eot,
                              eps_l2=args.eps_l2,
                              step_l2=args.step_l2, random_start=args.random_start, eot_batch=args.eot_batch)
    attacks = parse_attacks(args.attacks)
    for attack in attacks:
        attack.check_available()
    dataset = load_dataset(args.dataset, args.image_size)
    indices = select_indices(len(dataset), args.num_images, args.shuffle_seed)
    defended = defended_model(args, dataset[0][0].shape[0])
    config = {k: v for k, v in vars(args).items() if k not in _NOT_IN_CONFIG and not callable(v)}
    return evaluate(defended.to(device), dataset, attacks, args.output, settings=settings, indices=indices,
                    seed=args.seed, batch_size=args.batch_size, config=config, progress=args.progress)


def dataset_name(spec: str) -> str:
    """Dataset name for the reports: ``torchvision:CIFAR10:ROOT`` -> ``cifar10``, ``npz:dir/test.npz`` -> ``test``."""
    kind, _, argument = spec.partition(":")
    if kind in ("bundled", "torchvision"):
        return argument.partition(":")[0].lower()
    return Path(argument.partition(",")[0].rstrip("/")).stem


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; prints the summary and writes the reports (rank 0). Returns the exit status
    (2: bad arguments)."""
    device = _device(args)
    try:
        with distributed(device):
            summary = _evaluate(args, device)
    except (ValueError, FileNotFoundError) as error:
        print(f"purifytf eval: error: {error}", file=sys.stderr)
        return 2
    if summary is not None:
        write_reports(args.output, summary, args.model_name or f"{args.purifier} + {args.classifier}",
                      args.dataset_name or dataset_name(args.dataset))
        print(summary_markdown(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="purifytf eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
