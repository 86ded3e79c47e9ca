"""SSNI under attack: which noise level its rule picks for clean, randomly perturbed and attacked images.

SSNI (on DiffPurify DDPM, t* = 0.1, 10 steps: the study's row; bundled Fashion-MNIST backbone and
statistics) picks t(x) in (bias, t* + bias] from each image's score norm. For the first ``--images``
images of the bundled slice this reports the level's mean, quartiles and the share at the largest level
``t* + bias``, for three inputs: the clean images, the clean images plus uniform Linf noise of radius
``--eps`` (an attack's random start), and PGD-EOT's Linf adversarial examples against the SSNI defence
itself (exact gradients, ``score_grad`` off: the study's first view; the bundled classifier)::

    python benchmarks/ssni_levels.py --images 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from purifytf import DefendedModel, pretrained
from purifytf.attacks import pgd_eot
from purifytf.evaluation import load_dataset

RESULTS = Path(__file__).parent / "results"


def summary(levels: torch.Tensor, top: int) -> dict:
    """Mean, quartiles and the share of images at the largest level ``top`` of (N,) levels in steps."""
    q = torch.quantile(levels.float(), torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"mean": levels.float().mean().item(), "quartiles": q, "at_max": (levels == top).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="images per attack (memory: about 0.1 GB each)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", type=Path, default=RESULTS / "ssni-levels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the purifier's noise while attacking
    data = load_dataset("bundled:fashion-mnist")
    x, y = data.images[: args.images], data.labels[: args.images]
    ssni = pretrained.ssni_purify(pretrained=True, steps=10)
    defended = DefendedModel(ssni, pretrained.fashion_mnist_cnn(pretrained=True))
    top = round(ssni.largest_level)
    generator = torch.Generator().manual_seed(0)
    attacked = [pgd_eot(defended, xb, yb, norm="Linf", eps=args.eps, step=args.eps / 4, steps=args.attack_steps,
                        eot=args.eot, generator=generator)
                for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size), strict=True)]
    inputs = {
        "clean": x,
        "uniform noise": (x + (2 * torch.rand(x.shape, generator=generator) - 1) * args.eps).clamp(0, 1),
        "PGD-EOT": torch.cat(attacked),
    }
    with torch.no_grad():
        rows = {name: summary(torch.cat([ssni.noise_levels(batch, torch.Generator().manual_seed(1))
                                         for batch in images.split(args.batch_size)]), top)
                for name, images in inputs.items()}
    result = {"settings": {k: v for k, v in vars(args).items() if k != "output"},
              "largest_level": top, "levels": rows,
              "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SSNI level (steps; largest {top}) on {args.images} images")
    for name, row in rows.items():
        q = ", ".join(f"{v:.0f}" for v in row["quartiles"])
        print(f"  {name:14s} mean {row['mean']:6.1f}  quartiles {q}  at the largest level {100 * row['at_max']:.0f} %")


if __name__ == "__main__":
    main()
