"""``purifytf demo``: every purifier on the embedded Fashion-MNIST default, under an adaptive attack.

Builds the defences of :func:`purifytf.default_defences` (bundled models, :func:`purifytf.create_purifier`), attacks
the first ``--images`` images of the bundled test slice with full-gradient PGD-EOT through each
defence (classifier and purifier together, gradients exact through every sampling step), prints
one table and writes a figure. The default budget is sized for about 3 minutes on 2 CPU cores and
is far below the evaluation protocol (200 steps x 20 EOT samples): it is a demonstration, not a
robustness claim; ``purifytf eval`` runs the full protocol.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .classifiers import fashion_mnist_cnn
from .defended import DefendedModel
from .evaluation.batched import pgd_eot_accuracy
from .evaluation.data import load_dataset
from .factory import default_defences

__all__ = ["add_arguments", "build_defences", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=100, help="test images (of the 1,000 bundled)")
    parser.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius (images in [0, 1])")
    parser.add_argument("--steps", type=int, default=5, help="PGD iterations")
    parser.add_argument("--eot", type=int, default=1, help="purifications averaged per gradient (EOT)")
    parser.add_argument("--diffpure-steps", type=int, default=10,
                        help="DiffPurify's reverse steps (the paper's 100 costs 10x more)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder of the figure")
    parser.add_argument("--no-progress", action="store_true")


def build_defences(diffpure_steps: int = 10) -> tuple[nn.Module, dict[str, nn.Module | None]]:
    """The bundled classifier and the demo's defences by table name (:func:`purifytf.default_defences`)."""
    classifier = fashion_mnist_cnn(pretrained=True)
    return classifier, default_defences(classifier=classifier, diffpure_steps=diffpure_steps)


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"| defence | clean acc. | robust acc. (PGD-EOT Linf {args.eps * 255:.0f}/255, {args.steps} steps x "
            f"{args.eot} EOT) | NFE / image | s / image |")
    lines = [head, "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {100 * r['clean']:.1f} % | {100 * r['robust']:.1f} % | {r['nfe']} | "
                     f"{r['seconds']:.3f} |")
    return "\n".join(lines)


def _figure(path: Path, x: Tensor, adversarial: Tensor, mask: Tensor, purified: dict[str, Tensor],
            ssni_t: dict[str, Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {"clean": x, "adversarial": adversarial, "saliency mask": mask, **purified}
    n = len(x)
    fig = plt.figure(figsize=(1.3 * len(columns), 1.3 * n + 2.4))
    grid = fig.add_gridspec(n + 1, len(columns), height_ratios=[1] * n + [1.8])
    for j, (title, images) in enumerate(columns.items()):
        for i in range(n):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(images[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    ax = fig.add_subplot(grid[n, :])
    for label, t in ssni_t.items():
        ax.hist(t.cpu().numpy(), bins=20, alpha=0.6, label=label)
    ax.set_xlabel("SSNI noise level t (steps of 1000)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    fig.suptitle("adversarial: PGD-EOT against SaliencyDiffPurify; each column purifies it", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check(args: argparse.Namespace, available: int) -> None:
    """Refuse settings the demo cannot run (a clear message instead of a traceback or a silent slice)."""
    if not 1 <= args.images <= available:
        raise ValueError(f"--images must be in [1, {available}] (the bundled test images), got {args.images}")
    if not 0 < args.eps <= 1:
        raise ValueError(f"--eps is a radius for images in [0, 1], e.g. 0.0314 (8/255); got {args.eps}")
    for name in ("steps", "eot", "diffpure_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    data = load_dataset("bundled:fashion-mnist")
    try:
        _check(args, len(data))
    except ValueError as error:
        print(f"purifytf demo: error: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x_all, y_all = data.images[: args.images].to(device), data.labels[: args.images].to(device)
    count = len(x_all)
    classifier, defences = build_defences(args.diffpure_steps)
    classifier.to(device)
    print(f"purifytf demo: {count} Fashion-MNIST test images, {device}, PGD-EOT Linf eps={args.eps:.4f} "
          f"steps={args.steps} eot={args.eot}, seed={args.seed}")
    rows, adversarial_for = [], {}
    for name, purifier in tqdm(defences.items(), desc="defences", disable=args.no_progress):
        defended = DefendedModel(purifier.to(device) if purifier is not None else None, classifier, normalize=None)
        bar = functools.partial(tqdm, desc=name, leave=False, disable=args.no_progress)
        result = pgd_eot_accuracy(defended, x_all, y_all, eps=args.eps, steps=args.steps, eot=args.eot,
                                  batch_size=args.batch_size, seed=args.seed, progress=bar)
        rows.append({"name": name, "clean": result["clean"], "robust": result["robust"], "nfe": result["nfe"],
                     "seconds": result["seconds_per_image"]})
        adversarial_for[name] = result["adversarial"]
    table = _table(rows, args)
    print(table)
    print("A demonstration budget, far below the protocol (200 steps x 20 EOT, majority vote): not a robustness "
          "claim. MODEL_CARD.md has the larger reduced evaluation; `purifytf eval` runs the protocol.")

    shown = slice(0, 6)
    saliency_name = "SaliencyDiffPurify"
    adversarial = adversarial_for[saliency_name][shown]
    torch.manual_seed(args.seed)
    with torch.no_grad():
        mask = defences[saliency_name].compute_mask(adversarial)
        purified = {name: p(adversarial) for name, p in defences.items() if p is not None}
        ssni = defences["SSNIPurify (on DiffPurify)"]
        ssni_t = {"clean": ssni.noise_levels(x_all),
                  "adversarial (vs SSNI)": ssni.noise_levels(adversarial_for["SSNIPurify (on DiffPurify)"])}
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / "demo.png"
    _figure(figure, x_all[shown], adversarial, mask.float(), purified, ssni_t)
    (args.out / "table.md").write_text(table + "\n")
    print(f"figure: {figure}   table: {args.out / 'table.md'}")
    return 0
