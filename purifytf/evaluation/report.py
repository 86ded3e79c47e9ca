"""Evaluation results in formats others read: a RobustBench ``model_info`` entry and a Hugging Face model-index.

``purifytf eval`` writes both next to its summary: ``model_info.json`` (RobustBench's fields: ``name``, ``dataset``,
``threat_model``, ``eps`` as ``"8/255"``, ``clean_acc``, ``autoattack_acc`` when AutoAttack ran, ``external`` for
the per-image minimum over every attack of the threat model (only when one of them attacks the defence itself,
adaptively or with BPDA: transfer and surrogate views alone give none), accuracies in percent as strings with two
decimals, ``number_forward_passes`` (one for a seeded defence); our attack settings, seeds and image count under
``"purifytf"``) and ``model_index.yaml`` (the card metadata block). ``hub.model_card(purifier, eval_run=OUTPUT)``
puts the same model-index into the card ``save_pretrained``/``push_to_hub`` write.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

__all__ = ["MODEL_INFO_FILE", "MODEL_INDEX_FILE", "card_data", "eps_text", "eval_results", "model_info",
           "threat_model", "write_reports"]

MODEL_INFO_FILE = "model_info.json"
MODEL_INDEX_FILE = "model_index.yaml"

_L2 = ("pgd-eot-l2", "pgd-eot-l2-sign")
_UNBOUNDED = ("cw", "deepfool")  # minimal-perturbation attacks: no threat model


def threat_model(attack: str) -> str | None:
    """``"Linf"``, ``"L2"`` or ``None`` (unbounded) for an attack name ``METHOD[@VIEW]``."""
    method = attack.partition("@")[0]
    return "L2" if method in _L2 else None if method in _UNBOUNDED else "Linf"


def eps_text(eps: float) -> str:
    """RobustBench's notation: multiples of 1/255 as ``"8/255"``, other radii as decimals (``"0.5"``)."""
    steps = round(eps * 255)
    return f"{steps}/255" if steps and abs(steps / 255 - eps) < 1e-9 else f"{eps:g}"


def _on_defence(attack: str) -> bool:
    """Whether the attack ``METHOD[@VIEW]`` attacks the defence itself (adaptive or BPDA, not a transfer or
    surrogate view)."""
    return attack.partition("@")[2] in ("", "bpda")


def _percent(accuracy: float) -> str:
    return f"{100 * accuracy:.2f}"


def model_info(summary: dict, name: str, dataset: str) -> dict:
    """RobustBench ``model_info`` entry of a :func:`~purifytf.evaluation.summarize` summary (see the module doc).

    The threat model is Linf unless every bounded attack on the defence itself (else every bounded attack) is L2.
    """
    config = summary["config"]
    minima = summary["robust_accuracy_by_threat_model"]
    on_defence = {threat_model(a) for a in summary["robust_accuracy"] if _on_defence(a)} - {None}
    model = "L2" if (on_defence or set(minima)) == {"L2"} else "Linf"
    settings = config["settings"]
    info = {"name": name, "dataset": dataset, "threat_model": model,
            "eps": eps_text(settings["eps_l2"] if model == "L2" else settings["eps"]),
            "clean_acc": _percent(summary["clean_accuracy"])}
    if "autoattack-rand" in summary["robust_accuracy"] and model == "Linf":
        info["autoattack_acc"] = _percent(summary["robust_accuracy"]["autoattack-rand"])
    attacks = [a for a in summary["robust_accuracy"] if threat_model(a) == model]
    on_the_defence = any(map(_on_defence, attacks))
    if on_the_defence and attacks != ["autoattack-rand"] and model in minima:
        info["external"] = _percent(minima[model])
        info["footnote"] = f"per-image minimum over {', '.join(attacks)} (adaptive evaluation, purifytf eval)"
    elif attacks and not on_the_defence:
        info["footnote"] = (f"{', '.join(attacks)}: no attack on the defence itself (adaptive or BPDA), so no robust "
                            "accuracy is reported (per-attack figures under purifytf; purifytf eval)")
    info["number_forward_passes"] = summary["passes_per_prediction"]
    info["purifytf"] = {
        "images": summary["images"], "attacks": list(summary["robust_accuracy"]),
        "robust_acc_per_attack": {a: _percent(v) for a, v in summary["robust_accuracy"].items()},
        "settings": settings, "seed": config["seed"], "seeds": summary["seeds"], "batch_size": config["batch_size"],
        "runs": config["runs"], "vote": config["vote"], "nfe_per_purification": summary["nfe_per_purification"],
    }
    return info


def eval_results(info: dict) -> list[EvalResult]:
    """Hugging Face ``EvalResult`` entries of a ``model_info`` entry: clean accuracy, AutoAttack, the adaptive
    minimum (values in percent; the attack and threat model in each metric's name)."""
    threat = f"{info['threat_model']} eps={info['eps']}"
    metrics = [("clean accuracy", info["clean_acc"])]
    if "autoattack_acc" in info:
        metrics.append((f"robust accuracy, AutoAttack-rand ({threat})", info["autoattack_acc"]))
    if "external" in info:
        attacks = ", ".join(a for a in info["purifytf"]["attacks"] if threat_model(a) == info["threat_model"])
        metrics.append((f"robust accuracy, per-image minimum over {attacks} ({threat})", info["external"]))
    return [EvalResult(task_type="image-classification", dataset_type=info["dataset"], dataset_name=info["dataset"],
                       metric_type="accuracy", metric_name=name, metric_value=float(value)) for name, value in metrics]


def card_data(eval_run: str | Path) -> dict:
    """``model_name`` and ``eval_results`` of the card of a ``purifytf eval`` output folder."""
    path = Path(eval_run) / MODEL_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; eval_run= takes the --output folder of a finished `purifytf eval`")
    info = json.loads(path.read_text())
    return {"model_name": info["name"], "eval_results": eval_results(info)}


def write_reports(output: str | Path, summary: dict, name: str, dataset: str) -> dict:
    """Write ``model_info.json`` and ``model_index.yaml`` into ``output``; returns the ``model_info`` entry."""
    output = Path(output)
    info = model_info(summary, name, dataset)
    (output / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (output / MODEL_INDEX_FILE).write_text(ModelCardData(**card_data(output)).to_yaml() + "\n")
    return info
