"""Speed of ``purifytf eval``'s harness against the batched path (``evaluation.batched.pgd_eot_accuracy``).

Same defence, images and attack (PGD-EOT Linf, same steps and EOT) through both, timed alternately in
one run so the ratio holds on a busy machine; per image and attack step. The harness also runs with
``batch_size=1``, the per-image protocol it used before::

    python benchmarks/eval_speed.py                      # bundled Fashion-MNIST DiffPurify (10 steps), CPU
    python benchmarks/eval_speed.py --images 64 --batch-size 32 --device cuda

Results go to ``benchmarks/results/eval-speed-<device>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from purifytf.attacks import Attack, AttackSettings
from purifytf.classifiers import fashion_mnist_cnn
from purifytf.defended import DefendedModel
from purifytf.evaluation import evaluate, load_dataset, pgd_eot_accuracy
from purifytf.factory import create_purifier

RESULTS = Path(__file__).parent / "results"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purifier", default="diffpure.fashion_mnist")
    parser.add_argument("--purifier-steps", type=int, default=10, help="reverse diffusion steps (the demo's 10)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="PGD-EOT iterations")
    parser.add_argument("--eot", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (after one warm-up round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    purifier = create_purifier(args.purifier, pretrained=True, steps=args.purifier_steps)
    defended = DefendedModel(purifier, fashion_mnist_cnn(pretrained=True), runs=1, normalize=None).to(device)
    dataset = Subset(load_dataset("bundled:fashion-mnist"), range(args.images))
    x = torch.stack([image for image, _ in dataset]).to(device)
    y = torch.tensor([int(label) for _, label in dataset], device=device)
    eps = 8 / 255
    settings = AttackSettings(eps=eps, step=2.5 * eps / args.steps, steps=args.steps, eot=args.eot)
    attacks = [Attack("pgd-eot-linf")]

    def batched():
        return pgd_eot_accuracy(defended, x, y, eps=eps, steps=args.steps, eot=args.eot, batch_size=args.batch_size)

    def harness(batch_size: int):
        with tempfile.TemporaryDirectory() as output:
            return evaluate(defended, dataset, attacks, output, settings=settings, batch_size=batch_size,
                            progress=False)

    paths = {"batched": batched, "harness": lambda: harness(args.batch_size), "harness, batch 1": lambda: harness(1)}
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            times[name].append(_seconds(fn))
    per_step = {name: statistics.median(t) / (args.images * args.steps) for name, t in times.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(t, times["batched"], strict=True))
              for name, t in times.items()}
    result = {"purifier": args.purifier, "purifier_steps": args.purifier_steps, "images": args.images,
              "batch_size": args.batch_size, "steps": args.steps, "eot": args.eot, "repeats": args.repeats,
              "device": str(device), "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "clean_accuracy": batched()["clean"], "seconds_per_image_and_step": per_step,
              "ratio_to_batched": ratios, "seconds": times}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"eval-speed-{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| path ({args.images} images, PGD-EOT {args.steps} steps x {args.eot} EOT, {args.purifier} "
          f"{args.purifier_steps} steps, {device}) | s / image / attack step | ratio to batched |")
    print("|---|---:|---:|")
    for name in paths:
        print(f"| {name} | {per_step[name]:.4f} | {ratios[name]:.2f} |")
    return result


if __name__ == "__main__":
    main()
