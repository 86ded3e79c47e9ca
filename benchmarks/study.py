"""The study of issue 17: do heterogeneous (SaliencyDiffPurify) and sample-specific (SSNI) noise beat uniform
DiffPure at equal NFE, with enough images to tell?

Every row is a defence (a purifier of :func:`purifytf.create_purifier` on the embedded Fashion-MNIST models,
majority vote of ``--runs`` fresh purifications) evaluated by :func:`purifytf.evaluation.evaluate`: batched
attacks (fixed batches of ``--batch-size`` consecutive images, seed ``--seed`` + the batch's first index, so
every row sees the same images and seeds), per-image records written as they come (jsonl), resumable across
sittings: rerun the same command and only missing batches run. An image is robust only if its clean prediction
is right and it survives every attack run on the row (SSNI: with ``score_grad`` off and on, the per-image
minimum; each version is also compared alone). Each method is compared, image by image, with the DiffPure rows
of equal NFE and sampler (IMPurify, at 1 NFE, with DiffPurify's 10-NFE rows; DDIM with DDPM; DiffPure at
t* = 0.2 with t* = 0.1; IMPurify's noise variants also with the shipped IMPurify; SSNI on SaliencyDiffPurify also
with SaliencyDiffPurify): difference in robust and clean accuracy, Newcombe's paired 95 % interval and the exact
McNemar p-value (:mod:`purifytf.evaluation.stats`).
Threats: Linf 8/255 (PGD-EOT with sign steps of ``2.5 eps / steps``, and AutoAttack-rand) and L2 0.5
(normalised-gradient PGD-EOT ``pgd-eot-l2`` and Lee & Kim's sign-step ``pgd-eot-l2-sign``, step 0.007). A second
classifier of another architecture, the held-out ``AllConvNet`` no purifier setting was tuned on
(:func:`purifytf.train.classifier.train_heldout_classifier`, the recipe the training example also checks its
purifiers with), is committed in ``results/heldout-classifier/`` (``--cache``): retraining it on another machine
gives another network, and every run records its classifier's weights digest, so records of two networks never pair.

    python benchmarks/study.py --images 512 --steps 20 --eot 4 --runs 10       # one sitting; rerun to resume
    python benchmarks/study.py ... --convergence [ROW ...]                     # steps and EOT doubled on a subset
    python benchmarks/study.py ... --convergence ROW --convergence-scales 4    # x4 against x2 (a ladder: 2 4)
    python benchmarks/study.py --images 64 --rows "DiffPurify DDIM t*=0.1" "SaliencyDiffPurify default" --threats linf
    torchrun --standalone --nproc_per_node 8 benchmarks/study.py ...            # 8 processes share the batches
    python benchmarks/study.py ... --records-only                               # the tables from the records, no attack

Writes per-image records under ``--records`` (default ``benchmarks/results/study/``),
``benchmarks/results/study.json`` and ``benchmarks/results/study.md`` (the tables for MODEL_CARD.md and README).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from purifytf import DefendedModel, create_purifier
from purifytf.attacks import AttackSettings, parse_attacks
from purifytf.classifiers import fashion_mnist_cnn
from purifytf.data import FASHION_MNIST_IDX, fashion_mnist
from purifytf.evaluation import default_device, distributed, evaluate, load_dataset, load_records
from purifytf.evaluation.harness import RUN_FILE, batch_places
from purifytf.evaluation.stats import paired_comparison, wilson_interval
from purifytf.nfe import count_nfe
from purifytf.saliency import find_stages
from purifytf.train.classifier import train_heldout_classifier

RESULTS = Path(__file__).parent / "results"
HELDOUT_CLASSIFIER = RESULTS / "heldout-classifier"
"""The held-out classifier the study's records were made with, committed: its training is reproducible on one
machine, not bitwise across machines, and records pair only if every row used the same network."""

THREATS: dict[str, dict[str, Any]] = {
    "linf": {"title": "Linf 8/255", "attacks": "pgd-eot-linf,autoattack-rand", "norm": "Linf"},
    "l2": {"title": "L2 0.5", "attacks": "pgd-eot-l2,pgd-eot-l2-sign", "norm": "L2"},
}
"""Threat -> its attacks (robust accuracy: the per-image minimum over them)."""


@dataclass(frozen=True)
class Row:
    """One defence of the study.

    Attributes:
        name: table name.
        variant: a :func:`purifytf.list_purifiers` name (``None``: no defence).
        settings: overrides of the variant's settings (``stages="deepest"``: the classifier's deepest stage only).
        attacked: purifier overrides per attacked version of the same defence (SSNI's ``score_grad`` off and
            on); the row's robust accuracy is the per-image minimum over them.
        view: the attacks' view (``"surrogate"``: the saliency paper's non-adaptive attack).
        baselines: the rows this row is compared with (the rules are stated once, in the header :func:`markdown`
            writes above the tables).
    """

    name: str
    variant: str | None
    settings: dict = field(default_factory=dict)
    attacked: tuple[dict, ...] = ({},)
    view: str = "adaptive"
    baselines: tuple[str, ...] = ()


_DDPM_10, _DDIM_10 = {"steps": 10, "sampler": "ddpm"}, {"steps": 10, "sampler": "ddim"}
_SSNI_VIEWS = ({"score_grad": False}, {"score_grad": True})
_DDIM_BASELINES = ("DiffPurify DDIM t*=0.1", "DiffPurify DDIM t*=0.2")
_FITS_MEMORY = {"checkpoint": True}
"""For the 100-NFE rows: gradient checkpointing of each network call (same values; a batch's attack takes about
4 GB instead of over 11, at about 4/3 the time)."""

ROWS: tuple[Row, ...] = (
    Row("no defence", None),
    Row("DiffPurify DDPM t*=0.1", "diffpure.fashion_mnist", {"t_star": 0.1, **_DDPM_10}),
    Row("DiffPurify DDIM t*=0.1", "diffpure.fashion_mnist", {"t_star": 0.1, **_DDIM_10},
        baselines=("DiffPurify DDPM t*=0.1",)),
    Row("DiffPurify DDPM t*=0.2", "diffpure.fashion_mnist", {"t_star": 0.2, **_DDPM_10},
        baselines=("DiffPurify DDPM t*=0.1",)),
    Row("DiffPurify DDIM t*=0.2", "diffpure.fashion_mnist", {"t_star": 0.2, **_DDIM_10},
        baselines=("DiffPurify DDPM t*=0.2", "DiffPurify DDIM t*=0.1")),
    Row("DiffPurify DDIM t*=0.2, 100 steps", "diffpure.fashion_mnist",
        {"t_star": 0.2, "steps": 100, "sampler": "ddim", **_FITS_MEMORY}, baselines=("DiffPurify DDIM t*=0.2",)),
    Row("SaliencyDiffPurify default", "saliency_diffpure.fashion_mnist", baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify reference (spacing 2, U=3)", "saliency_diffpure.fashion_mnist",
        {"spacing": 2, "resample_steps": 3, **_FITS_MEMORY},
        baselines=("DiffPurify DDIM t*=0.2, 100 steps", "SaliencyDiffPurify default")),
    Row("SaliencyDiffPurify top-k 15 %", "saliency_diffpure.fashion_mnist", {"mask": "topk", "fraction": 0.15},
        baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify top-k 30 %", "saliency_diffpure.fashion_mnist", {"mask": "topk", "fraction": 0.3},
        baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify deepest stage only", "saliency_diffpure.fashion_mnist", {"stages": "deepest"},
        baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify continuous mask", "saliency_diffpure.fashion_mnist", {"mask": "continuous"},
        baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify mask_grad=True (adaptive)", "saliency_diffpure.fashion_mnist", {"mask_grad": True},
        baselines=_DDIM_BASELINES),
    Row("SaliencyDiffPurify default, paper's 2-call uniform surrogate attack (NOT adaptive)",
        "saliency_diffpure.fashion_mnist", view="surrogate",
        baselines=("SaliencyDiffPurify default", *_DDIM_BASELINES)),
    Row("SSNI on DiffPurify DDPM t*=0.1", "ssni_diffpure.fashion_mnist", {"steps": 10}, _SSNI_VIEWS,
        baselines=("DiffPurify DDPM t*=0.1",)),
    Row("SSNI on SaliencyDiffPurify", "ssni_saliency_diffpure.fashion_mnist", {}, _SSNI_VIEWS,
        baselines=(*_DDIM_BASELINES, "SaliencyDiffPurify default")),
    Row("IMPurify", "impure.fashion_mnist", baselines=("DiffPurify DDPM t*=0.1", "DiffPurify DDIM t*=0.1")),
    Row("IMPurify image_t=0.1, feature_t=0.2", "impure.fashion_mnist", {"image_t": 0.1, "feature_t": 0.2},
        baselines=("IMPurify", "DiffPurify DDPM t*=0.1")),
    Row("IMPurify image_t=0.2, feature_t=0.4", "impure.fashion_mnist", {"image_t": 0.2, "feature_t": 0.4},
        baselines=("IMPurify", "DiffPurify DDPM t*=0.1")),
    Row("IMPurify image_t=0.3, feature_t=0.6", "impure.fashion_mnist", {"image_t": 0.3, "feature_t": 0.6},
        baselines=("IMPurify", "DiffPurify DDPM t*=0.1")),
    Row("JPEG q=75", "jpeg", {"quality": 75}),
)
"""The rows of issue 17, item 3, on the embedded backbone."""

SECOND_CLASSIFIER_ROWS = ("no defence", "DiffPurify DDPM t*=0.1", "DiffPurify DDIM t*=0.1", "DiffPurify DDIM t*=0.2",
                          "SaliencyDiffPurify default", "SSNI on DiffPurify DDPM t*=0.1", "IMPurify", "JPEG q=75")
CONVERGENCE_ROWS = ("DiffPurify DDPM t*=0.1", "DiffPurify DDIM t*=0.1", "SaliencyDiffPurify default",
                    "SSNI on DiffPurify DDPM t*=0.1", "IMPurify")
"""The rows whose attack budget --convergence checks (those of them in --rows)."""


@dataclass(frozen=True)
class Budget:
    """Attack budget and protocol of a study (see the module doc)."""

    images: int = 512
    large_images: int = 256
    large_nfe: int = 50
    steps: int = 20
    eot: int = 4
    runs: int = 10
    batch_size: int = 32
    seed: int = 0

    def settings(self, threat: str, scale: int = 1) -> AttackSettings:
        """Attack settings of ``threat``; ``scale`` multiplies steps and EOT (the convergence check)."""
        steps = self.steps * scale
        return AttackSettings(eps=8 / 255, step=2.5 * (8 / 255) / steps if threat == "linf" else 0.007, steps=steps,
                              apgd_steps=steps, eot=self.eot * scale, eps_l2=0.5)

    def images_for(self, nfe: int) -> int:
        return min(self.images, self.large_images) if nfe >= self.large_nfe else self.images


# --- models ---------------------------------------------------------------------------------------

def make_purifier(variant: str | None, classifier: nn.Module, **settings: Any) -> nn.Module | None:
    """The one way the study builds a defence: :func:`purifytf.create_purifier` with bundled weights."""
    if variant is None:
        return None
    if settings.get("stages") == "deepest":
        settings["stages"] = find_stages(classifier, torch.zeros(1, 1, 28, 28))[-1:]
    if "saliency" in variant:
        settings["classifier"] = classifier
    return create_purifier(variant, pretrained=True, **settings)


# --- running ----------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _nfe(purifier: nn.Module | None, sample: torch.Tensor) -> int:
    if purifier is None:
        return 0
    with torch.no_grad(), count_nfe() as counter:
        purifier(sample)
    return counter.count


def _resolved(purifier: nn.Module | None) -> str | None:
    """The purifier's resolved hyper-parameters (its settings as ``repr`` shows them, and its base's for SSNI),
    recorded beside the row's records so that a changed shipped default refuses old records instead of silently
    reusing them."""
    if purifier is None:
        return None
    base = getattr(purifier, "base", None)
    return purifier._settings_repr() + (f"; base: {base._settings_repr()}" if base is not None else "")


def weights_digest(module: nn.Module) -> str:
    """A short sha256 of ``module``'s parameters and buffers (names, dtypes, shapes, values): recorded with every
    run for its classifier and its purifier, so that records made with other networks (a held-out classifier
    retrained elsewhere, a retrained backbone or IMPurify network) are refused."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _row_info(purifier: nn.Module | None, images: torch.Tensor) -> dict:
    """What a row states beside its accuracies: SSNI's temperature ``tau`` (the given one or the calibrated
    score-norm std it defaults to) and SaliencyDiffPurify's ``mask_density``, the mean of its mask over the
    row's clean ``images`` (N, C, H, W) (the fraction of pixels given the large level, for a binary mask)."""
    info = {}
    if hasattr(purifier, "eps_steps"):
        info["tau"] = purifier.tau if purifier.tau is not None else purifier.stats["std"]
    if hasattr(purifier, "compute_mask"):
        with torch.no_grad():
            info["mask_density"] = float(purifier.compute_mask(images).mean())
    return info


def run_row(row: Row, classifier: nn.Module, classifier_name: str, threat: str, dataset: Dataset, budget: Budget,
            records: Path, scale: int = 1, limit: int | None = None, progress: bool = True,
            attack: bool = True) -> dict | None:
    """Evaluate one row (every attacked version) and return its per-image outcomes and cost.

    Returns ``name``, ``indices``, ``clean`` and ``robust`` (per image, in index order), ``per_attack``
    (attack name -> per-image robustness, minimum over the attacked versions), ``per_version`` (per attacked
    version counted: per-image robustness), ``nfe``,
    ``seconds_per_image`` (the attacked versions), ``attacked`` (the versions counted), ``planned`` (the images the
    row is to have) and ``info`` (:func:`_row_info`). ``attack=False`` runs no attack and reports the records there
    are: each attacked version on its leading images with records (a row resumed across sittings: all versions
    on the images they all have), the versions with none left out (fewer than all: robust accuracy is an upper
    bound); a row with no records returns ``None``.
    """
    settings = budget.settings(threat, scale)
    attacks = parse_attacks(",".join(f"{a}@{row.view}" if row.view != "adaptive" else a
                                     for a in THREATS[threat]["attacks"].split(",")))
    sample = dataset[0][0][None].to(next(classifier.parameters()).device)
    outcomes, counted = [], []
    for k, overrides in enumerate(row.attacked):
        folder = records / classifier_name / (threat if scale == 1 else f"{threat}-x{scale}") / _slug(row.name)
        folder = folder / f"attacked-{k}" if len(row.attacked) > 1 else folder
        if not attack and not (folder / RUN_FILE).exists():
            continue  # never run: no purifier to build
        purifier = make_purifier(row.variant, classifier, **{**row.settings, **overrides})
        purifier = purifier.to(sample.device) if purifier is not None else None
        nfe = _nfe(purifier, sample)
        n = min(budget.images_for(nfe), limit or budget.images, len(dataset))
        indices = list(range(n))
        defended = DefendedModel(purifier, classifier, runs=budget.runs, normalize=None)
        config = {"row": row.name, "variant": row.variant, "row_settings": {**row.settings, **overrides},
                  "purifier": _resolved(purifier), "view": row.view, "classifier": classifier_name,
                  "classifier_weights": weights_digest(classifier),
                  "purifier_weights": None if purifier is None else weights_digest(purifier)}
        evaluate(defended, dataset, attacks, folder, settings=settings, indices=indices, seed=budget.seed,
                 batch_size=budget.batch_size, config=config, progress=progress, run_missing=attack)
        found = load_records(folder, batch_places(indices, budget.batch_size))
        recorded = list(itertools.takewhile(found.__contains__, indices))  # the leading images with records
        if recorded and (len(recorded) == len(indices) or not attack):
            outcomes.append([found[i] for i in recorded])
            counted.append(overrides)
    if not outcomes:
        return None
    outcomes = [o[:min(map(len, outcomes))] for o in outcomes]
    first = outcomes[0]
    info = _row_info(purifier, torch.stack([dataset[i][0] for i in indices]).to(sample.device))
    return {
        "name": row.name, "indices": [r["index"] for r in first],
        "clean": [r["clean_correct"] for r in first],
        "robust": [all(o[i]["robust"] for o in outcomes) for i in range(len(first))],
        "per_attack": {a.name: [all(o[i]["attacks"][a.name]["robust"] for o in outcomes) for i in range(len(first))]
                       for a in attacks},
        "per_version": [[r["robust"] for r in o] for o in outcomes],
        "nfe": first[0]["nfe"] if first else 0,
        "seconds_per_image": sum(sum(r["seconds"] for r in o) / len(o) for o in outcomes),
        "attacked": counted, "planned": len(indices), "info": info,
    }


def _accuracy(outcomes: list[bool]) -> dict:
    k, n = sum(outcomes), len(outcomes)
    return {"accuracy": k / n, "interval": wilson_interval(k, n), "n": n}


def compare(result: dict, baseline: dict) -> dict:
    """Paired robust and clean differences (result minus baseline) on the images both rows evaluated."""
    n = min(len(result["indices"]), len(baseline["indices"]))
    if result["indices"][:n] != baseline["indices"][:n]:
        raise ValueError(f"{result['name']!r} and {baseline['name']!r} were not run on the same images")
    return {"vs": baseline["name"], "n": n,
            "robust": paired_comparison(result["robust"][:n], baseline["robust"][:n]),
            "clean": paired_comparison(result["clean"][:n], baseline["clean"][:n])}


def summarize_row(result: dict, row: Row, by_name: dict[str, dict]) -> dict:
    """A row of study.json: accuracies with Wilson intervals, cost, paired comparisons with its baselines (of a row
    attacked in several versions also each version's, ``version_comparisons``, each with its ``attacked``)."""
    baselines = [by_name[b] for b in row.baselines if b in by_name]
    versions = list(zip(result["attacked"], result["per_version"], strict=True)) if len(result["attacked"]) > 1 else []
    return {
        "name": result["name"], "variant": row.variant, "settings": row.settings, "view": row.view,
        "attacked": result["attacked"], "upper_bound": len(result["attacked"]) < len(row.attacked),
        "n": len(result["indices"]), "planned": result["planned"], "nfe": result["nfe"],
        "seconds_per_image": result["seconds_per_image"], "clean": _accuracy(result["clean"]),
        "robust": _accuracy(result["robust"]),
        "robust_per_attack": {name: _accuracy(v) for name, v in result["per_attack"].items()},
        "robust_per_version": [{"attacked": attacked, **_accuracy(robust)} for attacked, robust in versions],
        "comparisons": [compare(result, baseline) for baseline in baselines],
        "version_comparisons": [{"attacked": attacked, **compare({**result, "robust": robust}, baseline)}
                                for attacked, robust in versions for baseline in baselines],
        **result["info"],
    }


def run_study(rows: list[Row], classifiers: dict[str, nn.Module], threats: list[str], dataset: Dataset,
              budget: Budget, records: Path, rows_per_classifier: dict[str, tuple[str, ...]] | None = None,
              progress: bool = True, attack: bool = True) -> dict:
    """Every (classifier, threat, row); returns ``{"tables": [...]}``, one table per classifier and threat
    (``attack=False``: from the records there are, see :func:`run_row`)."""
    jobs = [(c, t, r) for c in classifiers for t in threats for r in rows
            if rows_per_classifier is None or c not in rows_per_classifier or r.name in rows_per_classifier[c]]
    results: dict[tuple[str, str], dict[str, dict]] = {}
    bar = tqdm(jobs, desc="study", disable=not progress, dynamic_ncols=True)
    for classifier_name, threat, row in bar:
        bar.set_postfix_str(f"{classifier_name} {threat} {row.name}"[:60])
        result = run_row(row, classifiers[classifier_name], classifier_name, threat, dataset, budget, records,
                         progress=progress, attack=attack)
        if result is not None:
            results.setdefault((classifier_name, threat), {})[row.name] = result
    by_row = {r.name: r for r in rows}
    tables = [{"classifier": c, "threat": t, "title": THREATS[t]["title"], "attacks": THREATS[t]["attacks"],
               "rows": [summarize_row(res, by_row[name], found) for name, res in found.items()]}
              for (c, t), found in results.items()]
    return {"tables": tables}


def convergence(rows: list[Row], classifier: nn.Module, classifier_name: str, threat: str, dataset: Dataset,
                budget: Budget, records: Path, images: int, progress: bool = True, attack: bool = True,
                scales: tuple[int, ...] = (2,)) -> list[dict]:
    """Robust accuracy with steps and EOT multiplied by each of ``scales`` against half that budget, on the first
    ``images`` images: the paired difference (doubled minus half) should lie within 1 point. Scale 1 is the study's
    row, evaluated in full (its records and summary stay the study's); the other budgets run on the subset only."""
    report = []
    for row in rows:
        runs = {s: run_row(row, classifier, classifier_name, threat, dataset, budget, records, s,
                           images if s > 1 else None, progress, attack)
                for s in sorted({*scales, *(s // 2 for s in scales)})}
        for scale in scales:
            base, doubled = runs[scale // 2], runs[scale]
            if base is None or doubled is None or base["attacked"] != doubled["attacked"]:
                continue  # only the same attacked versions in both runs compare like with like
            n = min(len(base["robust"]), len(doubled["robust"]))  # records-only: as far as both have records
            difference = paired_comparison(doubled["robust"][:n], base["robust"][:n])
            report.append({"name": row.name, "threat": threat, "n": difference["n"], "planned": images,
                           "budget": [budget.steps * scale // 2, budget.eot * scale // 2],
                           "budget_doubled": [budget.steps * scale, budget.eot * scale],
                           "robust": _accuracy(base["robust"][:n])["accuracy"],
                           "robust_doubled": _accuracy(doubled["robust"][:n])["accuracy"], "difference": difference,
                           "converged": abs(difference["difference"]) <= 0.01})
    return report


# --- reporting --------------------------------------------------------------------------------------

def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _with_interval(acc: dict) -> str:
    low, high = acc["interval"]
    return f"{_pct(acc['accuracy'])} [{_pct(low)}, {_pct(high)}]"


def _difference(comparison: dict) -> str:
    low, high = comparison["interval"]
    return (f"{100 * comparison['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], "
            f"p = {comparison['p_value']:.3g} ({comparison['only_a']}/{comparison['only_b']})")


def _row_label(row: dict) -> str:
    """The row's name with what it states beside it: SSNI's tau, a saliency mask's density, an upper bound."""
    label = row["name"] + (f" (tau {row['tau']:.3g})" if row.get("tau") is not None else "")
    label += f" (mask {_pct(row['mask_density'])} %)" if row.get("mask_density") is not None else ""
    if row.get("upper_bound"):
        label += f" (upper bound: attacked with {'; '.join(map(_version, row['attacked']))} only)"
    if row.get("planned", row["n"]) > row["n"]:
        label += f" (partial: {row['n']} of {row['planned']} images so far)"
    return label


def _version(overrides: dict) -> str:
    """An attacked version's purifier overrides, e.g. ``score_grad=False``."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the row's settings"


def _accuracy_table(table: dict) -> list[str]:
    """Per row: images, NFE, cost, clean and robust accuracy, and the robust accuracy each attack alone leaves
    (the table MODEL_CARD.md and README show)."""
    attacks = table["attacks"].split(",")
    lines = ["| defence | n | NFE | s / image | clean % [95 % CI] | robust % [95 % CI] | "
             + " | ".join(f"{a} only" for a in attacks) + " |", "|---|" + "---:|" * (5 + len(attacks))]
    for row in table["rows"]:
        alone = " | ".join(_pct(acc["accuracy"]) for acc in row["robust_per_attack"].values())
        lines.append(f"| {_row_label(row)} | {row['n']} | {row['nfe']} | {row['seconds_per_image']:.2f} | "
                     f"{_with_interval(row['clean'])} | {_with_interval(row['robust'])} | {alone} |")
    return lines


def _difference_table(table: dict) -> list[str]:
    """Per row and each row it is compared with: the paired robust and clean differences (a row attacked in several
    versions: also each version's robust difference)."""
    lines = ["| defence | compared with | robust difference | clean difference |", "|---|---|---|---|"]
    for row in table["rows"]:
        for i, c in enumerate(row["comparisons"] + row["version_comparisons"]):
            against = f"{c['vs']} (n {c['n']}" + (f"; attacked with {_version(c['attacked'])} only)"
                                                    if "attacked" in c else ")")
            name = row["name"] + (" (upper bound)" if row.get("upper_bound") else "")
            lines.append(f"| {name if i == 0 else ''} | {against} | {_difference(c['robust'])} | "
                         f"{_difference(c['clean'])} |")
    return lines


def markdown(study: dict) -> str:
    """The study's tables (accuracies and differences in points)."""
    b = study["budget"]
    lines = [f"Fashion-MNIST bundled test slice; {b['images']} images per row ({b['large_images']} for rows of "
             f">= {b['large_nfe']} NFE: the first ones), the same images and seeds for every row (seed {b['seed']} + "
             f"the first index of each batch of {b['batch_size']}); {b['steps']} attack steps x {b['eot']} EOT, "
             f"majority vote of {b['runs']} purifications; {study['machine']}. Accuracies in % with Wilson 95 % "
             "intervals; differences in points against the DiffPure row of equal NFE and sampler on the same images "
             "(IMPurify: against DiffPurify's 10-NFE rows; DDIM: against DDPM; DiffPure at t* = 0.2: against "
             "t* = 0.1; the 100-step DDIM reference: against its 10-step row; IMPurify's noise variants also against "
             "the shipped IMPurify, the SaliencyDiffPurify reference preset and SSNI on SaliencyDiffPurify also "
             "against SaliencyDiffPurify's default): "
             "Newcombe's paired 95 % interval, exact McNemar p-value (images won/lost). Robust: the per-image "
             "minimum over the attacks listed (SSNI: and over its attacked versions, each also compared alone). "
             "s / image: seconds per image of one process, a row's attacked versions added up."]
    for table in study["tables"]:
        lines += ["", f"### {table['title']}, classifier {table['classifier']} (attacks: {table['attacks']})", ""]
        lines += _accuracy_table(table)
        if any(row["comparisons"] for row in table["rows"]):
            lines += ["", "Paired differences (the row minus the row it is compared with):", ""]
            lines += _difference_table(table)
    if study.get("convergence"):
        lines += ["", "### Attack-strength convergence (steps and EOT doubled)", "",
                  "| defence | threat | steps x EOT | n | robust | robust, doubled | difference | within 1 point |",
                  "|---|---|---|---:|---:|---:|---|---|"]
        for c in study["convergence"]:
            budgets = " -> ".join("{} x {}".format(*b) for b in (c["budget"], c["budget_doubled"]))
            n = f"{c['n']} of {c['planned']} so far" if c["planned"] > c["n"] else c["n"]
            lines.append(f"| {c['name']} | {c['threat']} | {budgets} | {n} | {_pct(c['robust'])} | "
                         f"{_pct(c['robust_doubled'])} | {_difference(c['difference'])} | "
                         f"{'yes' if c['converged'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _power_of_two(text: str) -> int:
    value = int(text)
    if value < 2 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"a scale must be a power of two >= 2, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict | None:
    """Run the study; returns it on rank 0 (``None`` on the other ranks of a torchrun launch)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Budget()
    for name in ("images", "large_images", "large_nfe", "steps", "eot", "runs", "batch_size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--rows", nargs="*", choices=[r.name for r in ROWS], metavar="ROW",
                        help="only these rows (names of ROWS; default: all)")
    parser.add_argument("--threats", nargs="+", default=list(THREATS), choices=list(THREATS))
    parser.add_argument("--classifiers", nargs="+", default=["cnn", "heldout"], choices=["cnn", "heldout"])
    parser.add_argument("--convergence", nargs="*", choices=CONVERGENCE_ROWS, metavar="ROW",
                        help="also run steps and EOT doubled on a subset, for these rows (default: those of "
                             "CONVERGENCE_ROWS in --rows)")
    parser.add_argument("--convergence-images", type=int, default=128)
    parser.add_argument("--convergence-scales", type=_power_of_two, nargs="+", default=[2], metavar="SCALE",
                        help="compare steps and EOT x SCALE with x SCALE/2 (powers of two; 2: against the study's)")
    parser.add_argument("--records", type=Path, default=RESULTS / "study")
    parser.add_argument("--output", type=Path, default=RESULTS / "study.json")
    parser.add_argument("--cache", type=Path, default=HELDOUT_CLASSIFIER,
                        help="the held-out classifier's folder (trained into it if empty)")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_IDX,
                        help="Fashion-MNIST IDX files (to train the held-out classifier)")
    parser.add_argument("--device", help="default: cuda if available (torchrun: GPU LOCAL_RANK mod GPUs), else cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--records-only", action="store_true",
                        help="run no attack: the tables from the records there are (rows with none are left out; a "
                             "row part-run is reported on the images it has, marked partial; a row with an attacked "
                             "version never run is reported on the others, as an upper bound)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(**{k: getattr(args, k) for k in asdict(defaults)})
    device = torch.device(args.device) if args.device else default_device()
    with distributed(device) as (rank, world):
        study = _run(args, budget, device, rank, world)
    if study is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(study, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(markdown(study))
        print(markdown(study))
        print(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return study


def _run(args: argparse.Namespace, budget: Budget, device: torch.device, rank: int, world: int) -> dict | None:
    """The study's rows (and convergence check) on this rank's share of the batches; the study on rank 0."""
    rows = [r for r in ROWS if not args.rows or r.name in args.rows]
    progress = not args.no_progress and rank == 0
    classifiers = {"cnn": fashion_mnist_cnn(pretrained=True)}
    if "heldout" in args.classifiers:
        if rank > 0:
            dist.barrier()  # rank 0 trains (or loads) the held-out classifier first, the others load it
        classifiers["heldout"] = train_heldout_classifier(functools.partial(fashion_mnist, args.data),
                                                          cache=args.cache)
        if rank == 0 and world > 1:
            dist.barrier()
    classifiers = {k: v.to(device) for k, v in classifiers.items() if k in args.classifiers}
    dataset = load_dataset("bundled:fashion-mnist")
    start = time.perf_counter()
    study = run_study(rows, classifiers, args.threats, dataset, budget, args.records,
                      {"heldout": SECOND_CLASSIFIER_ROWS}, progress=progress, attack=not args.records_only)
    if args.convergence is not None:
        chosen = [r for r in rows if r.name in (args.convergence or CONVERGENCE_ROWS)]
        study["convergence"] = [c for t in args.threats for c in convergence(
            chosen, classifiers["cnn"], "cnn", t, dataset, budget, args.records, args.convergence_images, progress,
            not args.records_only, tuple(args.convergence_scales))]
    if rank > 0:
        return None
    return study | {"budget": asdict(budget), "device": str(device),
                    "minutes_this_sitting": (time.perf_counter() - start) / 60,
                    "machine": _machine(device, world, args.records_only),
                    "records": str(args.records),
                    "heldout_classifier": _metrics(args.cache) if "heldout" in args.classifiers else None}


def _machine(device: torch.device, world: int, records_only: bool) -> str:
    """This process's machine, stated as the regenerating one when the tables come from the records only (the rows
    ran elsewhere or earlier; their s / image are as each row measured it)."""
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {world} x {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, {device.type}")
    return (f"tables regenerated from the per-image records without attacking (on {machine}); s / image as each row "
            "measured it" if records_only else machine)


def _metrics(cache: Path) -> dict | None:
    path = cache / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    main()
