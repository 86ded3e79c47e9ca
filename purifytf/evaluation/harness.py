"""The robustness evaluation loop: per-image records as they come, resumable, shardable.

Per image ``i`` (a dataset index) with seed ``seed + i``: the defence's clean prediction, then
every attack (each started from the same seeded RNG state) judged by the defence's vote. An
image is robust only if it is classified correctly and every attack fails. Records go to
``OUTPUT/images.jsonl`` (rank ``r > 0`` of a distributed run: ``images.rank{r}.jsonl``) one line
per image, flushed at once; a rerun skips the images already there. Rank 0 then writes
``summary.json`` and ``summary.md``. ``run.json`` holds the run's configuration: a rerun with
another configuration in the same directory is refused.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..attacks import Attack, AttackSettings
from ..defended import DefendedModel
from ..nfe import count_nfe

__all__ = ["evaluate", "evaluate_image", "load_records", "summarize", "summary_markdown"]

RUN_FILE = "run.json"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_image(defended: DefendedModel, image: torch.Tensor, label: int, attacks: Sequence[Attack],
                   settings: AttackSettings, seed: int, num_classes: int) -> dict:
    """One image (C, H, W) in [0, 1] -> its record (predictions, robustness per attack, cost)."""
    device = _device(defended)
    x = image[None].to(device)
    y = torch.tensor([label], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with count_nfe() as total:
        _seed_everything(seed)
        clean_pred = int(defended.predict(x))
        nfe = getattr(defended.purifier, "last_nfe", 0)
        results = {attack.name: _attack_result(defended, attack, x, y, settings, seed, num_classes)
                   if clean_pred == label else {"robust": False, "skipped": True} for attack in attacks}
    return {
        "label": label, "seed": seed, "clean_pred": clean_pred, "clean_correct": clean_pred == label,
        "attacks": results, "robust": clean_pred == label and all(r["robust"] for r in results.values()),
        "nfe": nfe, "nfe_total": total.count, "seconds": time.perf_counter() - start,
        "peak_memory_mib": _peak_memory_mib(device),
    }


def _attack_result(defended: DefendedModel, attack: Attack, x: torch.Tensor, y: torch.Tensor,
                   settings: AttackSettings, seed: int, num_classes: int) -> dict:
    _seed_everything(seed)
    start = time.perf_counter()
    x_adv = attack(defended, x, y, settings, num_classes)
    pred = int(defended.predict(x_adv))
    return {"robust": pred == int(y), "pred": pred, "linf": (x_adv - x).abs().max().item(),
            "seconds": time.perf_counter() - start}


def _device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _records_files(output: Path) -> list[Path]:
    return sorted(output.glob("images*.jsonl"))


def load_records(output: str | Path) -> dict[int, dict]:
    """Every complete per-image record in ``output`` by dataset index (a torn last line is ignored)."""
    records: dict[int, dict] = {}
    for path in _records_files(Path(output)):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.setdefault(record["index"], record)
    return records


def _open_records(output: Path, rank: int):
    """Append handle of this rank's records file, cut back to its last complete line."""
    path = output / ("images.jsonl" if rank == 0 else f"images.rank{rank}.jsonl")
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a")


def _check_run_config(output: Path, config: dict, rank: int) -> None:
    """Refuse to mix results of different configurations in one directory; record the configuration."""
    path = output / RUN_FILE
    config = json.loads(json.dumps(config))
    if path.exists():
        saved = json.loads(path.read_text())
        changed = {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
                   if saved.get(k) != config.get(k)}
        if changed:
            details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"{output} holds results of another configuration ({details}); "
                             "use a new output directory")
    _barrier()
    if rank == 0 and not path.exists():
        path.write_text(json.dumps(config, indent=2) + "\n")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def evaluate(defended: DefendedModel, dataset: Dataset, attacks: Sequence[Attack], output: str | Path, *,
             settings: AttackSettings | None = None, indices: Sequence[int] | None = None, seed: int = 0,
             config: dict | None = None, progress: bool = True) -> dict | None:
    """Evaluate ``defended`` on ``dataset[indices]`` (default: all) under ``attacks``.

    Writes per-image records to ``output`` as they come and resumes from those already there.
    Under ``torch.distributed`` each rank takes every ``world``-th remaining image; rank 0
    gathers the records and writes the summary. ``config`` (JSON-able) joins the recorded run
    configuration. Returns the summary on rank 0, ``None`` on other ranks.
    """
    settings = settings or AttackSettings()
    rank, world = _rank_world()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if len(set(indices)) != len(indices) or any(not 0 <= i < len(dataset) for i in indices):
        raise ValueError(f"indices must be distinct and in [0, {len(dataset)})")
    run_config = {**(config or {}), "attacks": [a.name for a in attacks], "settings": asdict(settings), "seed": seed,
                  "runs": defended.runs, "vote": defended.vote, "normalization": defended.normalization}
    _check_run_config(output, run_config, rank)
    done = load_records(output)
    _barrier()  # every rank has read the same finished set before any rank adds to it
    mine = [i for i in indices if i not in done][rank::world]
    new = _evaluate_indices(defended, dataset, mine, attacks, settings, seed, output, rank, progress)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(new, gathered, dst=0)
        new = [record for part in gathered or () for record in part]
    if rank != 0:
        return None
    records = {**done, **{r["index"]: r for r in new}}
    summary = summarize([records[i] for i in indices if i in records], attacks, run_config)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "summary.md").write_text(summary_markdown(summary))
    return summary


def _evaluate_indices(defended: DefendedModel, dataset: Dataset, indices: list[int], attacks: Sequence[Attack],
                      settings: AttackSettings, seed: int, output: Path, rank: int, progress: bool) -> list[dict]:
    records = []
    if not indices:
        return records
    with torch.no_grad():
        num_classes = defended(dataset[indices[0]][0][None].to(_device(defended))).shape[-1]
    bar = tqdm(indices, desc=f"eval rank {rank}" if rank else "eval", position=rank, disable=not progress,
               dynamic_ncols=True)
    with _open_records(output, rank) as file:
        for index in bar:
            image, label = dataset[index]
            if int(label) < 0:
                raise ValueError(f"image {index} has no label (label {int(label)}): robust accuracy needs labels")
            record = {"index": index,
                      **evaluate_image(defended, image, int(label), attacks, settings, seed + index, num_classes)}
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
            records.append(record)
            bar.set_postfix(clean=_mean(r["clean_correct"] for r in records),
                            robust=_mean(r["robust"] for r in records))
    return records


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(records: Sequence[dict], attacks: Sequence[Attack], config: dict | None = None) -> dict:
    """Accuracies and costs over per-image records (in [0, 1]; memory in MiB)."""
    return {
        "images": len(records),
        "clean_accuracy": _mean(r["clean_correct"] for r in records),
        "robust_accuracy": {a.name: _mean(r["attacks"][a.name]["robust"] for r in records) for a in attacks},
        "robust_accuracy_overall": _mean(r["robust"] for r in records),
        "nfe_per_purification": _mean(r["nfe"] for r in records),
        "seconds_per_image": _mean(r["seconds"] for r in records),
        "peak_memory_mib": max((r["peak_memory_mib"] for r in records), default=float("nan")),
        "seeds": "base seed + dataset index",
        "config": config or {},
    }


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table (accuracies in %)."""
    rows = [("clean", summary["clean_accuracy"])]
    rows += [(f"robust: {name}", acc) for name, acc in summary["robust_accuracy"].items()]
    rows.append(("robust: all attacks (per-image minimum)", summary["robust_accuracy_overall"]))
    lines = ["| accuracy | % |", "| --- | --- |", *(f"| {name} | {100 * acc:.2f} |" for name, acc in rows)]
    cost = (f"\n{summary['images']} images (seed {summary['config'].get('seed', '?')} + index); "
            f"NFE per purification {summary['nfe_per_purification']:.1f}; "
            f"{summary['seconds_per_image']:.2f} s per image; peak memory {summary['peak_memory_mib']:.0f} MiB\n")
    return "\n".join(lines) + "\n" + cost
