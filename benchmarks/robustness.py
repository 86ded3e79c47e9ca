"""Robust accuracy of every purifier on the embedded Fashion-MNIST models, and accuracy vs NFE.

Full-gradient PGD-EOT through classifier and purifier (exact gradients through every sampling step),
batched (:func:`purifytf.evaluation.pgd_eot_accuracy`), predictions by majority vote over ``--runs``
purifications. The paper protocol is 200 steps x 20 EOT samples on >= 512 images; on a 2-core CPU
this script runs a reduced budget, and every result records the budget it was measured with::

    python benchmarks/robustness.py --images 100 --steps 10 --eot 1 --runs 5 \\
        --threats linf-8 --defences "DiffPurify" "SaliencyDiffPurify"     # accuracy vs NFE
    python benchmarks/robustness.py --images 100 --steps 10 --threats linf-8 linf-16 l2-0.5   # all defences

Results: ``benchmarks/results/robustness-<tag>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from purifytf import DefendedModel, default_defences
from purifytf.classifiers import fashion_mnist_cnn
from purifytf.evaluation import load_dataset, pgd_eot_accuracy
from purifytf.factory import defence_table, selects

RESULTS = Path(__file__).parent / "results"
THREATS = {"linf-8": ("Linf", 8 / 255), "linf-16": ("Linf", 16 / 255), "l2-0.5": ("L2", 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="purifications in the majority vote")
    parser.add_argument("--threats", nargs="+", default=["linf-8"], choices=sorted(THREATS))
    parser.add_argument("--defences", nargs="*",
                        help="only these defences: a table name picks that one, other text every name containing it")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset("bundled:fashion-mnist")
    x, y = data.images[: args.images].to(device), data.labels[: args.images].to(device)
    classifier = fashion_mnist_cnn(pretrained=True).to(device)
    results = {"budget": {k: getattr(args, k) for k in ("images", "steps", "eot", "runs", "seed")},
               "step": "2.5 * eps / steps", "device": str(device),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "rows": []}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"robustness-{args.tag}.json"
    names = [name for name in defence_table() if not args.defences or any(selects(key, name) for key in args.defences)]
    for name in names:
        purifier = default_defences([name], classifier=classifier)[name]
        defended = DefendedModel(purifier.to(device) if purifier is not None else None, classifier, runs=args.runs,
                                 normalize=None)
        for threat in args.threats:
            norm, eps = THREATS[threat]
            start = time.perf_counter()
            bar = functools.partial(tqdm, desc=f"{name} {threat}", leave=False)
            r = pgd_eot_accuracy(defended, x, y, eps=eps, steps=args.steps, eot=args.eot, norm=norm,
                                 batch_size=args.batch_size, seed=args.seed, progress=bar)
            row = {"defence": name, "threat": threat, "clean": r["clean"], "robust": r["robust"], "nfe": r["nfe"],
                   "minutes": (time.perf_counter() - start) / 60}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive an interruption
    print(markdown(results))
    print(f"wrote {path}")


def markdown(results: dict) -> str:
    b = results["budget"]
    lines = [f"{b['images']} images, PGD-EOT {b['steps']} steps x {b['eot']} EOT (step 2.5 eps / steps), "
             f"majority vote of {b['runs']}, seed {b['seed']}; {results['device']}, {results['machine']}", "",
             "| defence | threat | NFE | clean acc. | robust acc. | minutes |", "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['defence']} | {r['threat']} | {r['nfe']} | {100 * r['clean']:.1f} % | "
                     f"{100 * r['robust']:.1f} % | {r['minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
