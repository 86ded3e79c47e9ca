"""What limits IMPurify on Fashion-MNIST: its inference noise levels against clean accuracy and PSNR (issue 18).

The bundled IMPurify network at each ``image_t/feature_t`` pair (fractions of T): one purification of each image
of the bundled test slice (seed 0), the mean per-image PSNR to the clean image, and the clean accuracy of the
bundled classifier and of the held-out ``AllConvNet`` (another architecture, used in no training) on the output
(:func:`purifytf.evaluation.clean.purification_metrics`)::

    python benchmarks/impure_noise.py --threads 1
    python benchmarks/impure_noise.py --settings 0.1/0.2 0/0.2 --images 500

Results go to ``benchmarks/results/impure-noise.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import torch

from purifytf import IMPurify
from purifytf.classifiers import fashion_mnist_cnn
from purifytf.data import FASHION_MNIST_IDX, ArrayData, fashion_mnist
from purifytf.evaluation import load_dataset
from purifytf.evaluation.clean import purification_metrics
from purifytf.hub import companion_file
from purifytf.train.classifier import train_heldout_classifier

HERE = Path(__file__).parent
SETTINGS = ("0.1/0.2", "0.05/0.1", "0.05/0.2", "0.1/0.1", "0.1/0.3", "0.15/0.2", "0/0.2")
"""0.1/0.2 (the shipped pair before the study chose 0.05/0.1) first, then lower and higher noise on each input."""


def run(args: argparse.Namespace) -> dict:
    data = load_dataset("bundled:fashion-mnist")
    n = min(args.images, len(data))
    test = ArrayData(data.images[:n], data.labels[:n])
    classifiers = {"classifier": fashion_mnist_cnn(pretrained=True),
                   "heldout_classifier": train_heldout_classifier(functools.partial(fashion_mnist, args.data),
                                                                  cache=args.cache)}
    rows = []
    for pair in args.settings:
        image_t, feature_t = (float(v) for v in pair.split("/"))
        purifier = IMPurify.from_pretrained(companion_file("fashion-mnist", "impure"), image_t=image_t,
                                            feature_t=feature_t)
        metrics = purification_metrics(purifier, test, classifiers, torch.Generator().manual_seed(0))
        rows.append({"image_t": image_t, "feature_t": feature_t, **metrics})
        print(json.dumps(rows[-1]), flush=True)
    return {"images": n, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows}


def markdown(results: dict) -> str:
    lines = [f"bundled IMPurify, first {results['images']} images of the bundled test slice, one purification "
             "each (seed 0)", "",
             "| image_t / feature_t | PSNR dB | bundled classifier | held-out classifier |", "|---|---:|---:|---:|"]
    first = results["rows"][0]
    lines.append(f"| no purification | | {100 * first['classifier_clean_accuracy']:.1f} % | "
                 f"{100 * first['heldout_classifier_clean_accuracy']:.1f} % |")
    for row in results["rows"]:
        lines.append(f"| {row['image_t']:g} / {row['feature_t']:g} | {row['psnr']:.2f} | "
                     f"{100 * row['classifier_accuracy_after_purification']:.1f} % | "
                     f"{100 * row['heldout_classifier_accuracy_after_purification']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="IMAGE_T/FEATURE_T")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "heldout-classifier",
                        help="the held-out classifier's folder (the study's, committed; trained into it if empty)")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_IDX,
                        help="Fashion-MNIST IDX files (to train the held-out classifier)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    (HERE / "results" / "impure-noise.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
