"""The robustness evaluation loop: per-image records as they come, resumable, shardable.

Images run in fixed batches (consecutive dataset indices of the run, seed ``seed`` + the batch's
first index): the defence's clean prediction, then every attack (each started from the same seeded
RNG state, as one batch of the correctly classified images) judged by the defence's vote, whose noise
comes from a stream of its own (the same for every attack), never the clean vote's. An image
is robust only if it is classified correctly and every attack fails. Records go to
``OUTPUT/images.jsonl`` (rank ``r > 0`` of a distributed run: ``images.rank{r}.jsonl``) one line
per image, flushed after each batch; a rerun redoes only the batches with missing images. Rank 0 then writes
``summary.json`` and ``summary.md``. ``run.json`` holds the run's configuration: a rerun with
another configuration in the same directory is refused.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..attacks import Attack, AttackSettings
from ..defended import DefendedModel
from ..nfe import count_nfe
from ..random import stream_seed
from .report import threat_model

__all__ = ["batch_places", "evaluate", "evaluate_batch", "judge_seed", "load_records", "summarize", "summary_markdown"]

RUN_FILE = "run.json"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too


def judge_seed(seed: int) -> int:
    """The seed of the votes on a batch's adversarial images: a stream apart from the clean vote's (``seed``).
    Were the vote to continue the attack's RNG state, an attack that draws no random numbers (a transfer
    attack without random start) would leave it where the clean vote began, and the vote would replay the
    clean vote's noise, overstating a stochastic defence's robustness."""
    return stream_seed(seed, 0)


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_batch(defended: DefendedModel, images: torch.Tensor, labels: torch.Tensor, attacks: Sequence[Attack],
                   settings: AttackSettings, seed: int) -> list[dict]:
    """Images (B, C, H, W) in [0, 1] with labels (B,) -> one record per image (predictions, robustness per
    attack, cost). The global RNG is seeded with ``seed`` before the clean pass and before each attack, and
    with :func:`judge_seed` ``(seed)`` before each vote on an attack's images; the attacks run on the correctly
    classified images only, as one batch."""
    device = _device(defended)
    x, y = images.to(device), labels.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with count_nfe() as total:
        _seed_everything(seed)
        clean_pred = defended.predict(x)
        nfe = getattr(defended.purifier, "last_nfe", 0)
        correct = clean_pred == y
        attacked = correct.nonzero().flatten().tolist()
        results = {attack.name: _attack_batch(defended, attack, x[correct], y[correct], settings, seed)
                   for attack in attacks} if attacked else {}
    seconds = (time.perf_counter() - start) / len(x)
    memory = _peak_memory_mib(device)
    rows = {i: row for row, i in enumerate(attacked)}
    records = []
    for i, (label, pred) in enumerate(zip(labels.tolist(), clean_pred.tolist(), strict=True)):
        per_attack = {a.name: results[a.name][rows[i]] if i in rows else {"robust": False, "skipped": True}
                      for a in attacks}
        records.append({"label": label, "seed": seed, "clean_pred": pred, "clean_correct": pred == label,
                        "attacks": per_attack, "robust": i in rows and all(r["robust"] for r in per_attack.values()),
                        "nfe": nfe, "nfe_total": total.count, "seconds": seconds, "peak_memory_mib": memory})
    return records


def _attack_batch(defended: DefendedModel, attack: Attack, x: torch.Tensor, y: torch.Tensor,
                  settings: AttackSettings, seed: int) -> list[dict]:
    """Per-image results of one attack on a batch: prediction, robustness, the perturbation's Linf and L2
    norms, seconds (the batch's time per image)."""
    _seed_everything(seed)
    start = time.perf_counter()
    x_adv = attack(defended, x, y, settings)
    _seed_everything(judge_seed(seed))
    pred = defended.predict(x_adv)
    seconds = (time.perf_counter() - start) / len(x)
    delta = (x_adv - x).flatten(1)
    return [{"robust": p == label, "pred": p, "linf": linf, "l2": l2, "seconds": seconds}
            for p, label, linf, l2 in zip(pred.tolist(), y.tolist(), delta.abs().amax(1).tolist(),
                                          delta.norm(dim=1).tolist(), strict=True)]


def _device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _records_files(output: Path) -> list[Path]:
    return sorted(output.glob("images*.jsonl"))


def load_records(output: str | Path, places: dict[int, list[int]] | None = None) -> dict[int, dict]:
    """Every complete per-image record in ``output`` by dataset index (a torn last line is ignored).

    ``places``: index -> ``[first index, position, size]`` of the batch the image falls in now; a record made in
    another batch (an extended run's earlier partial batch: other noise, other batch-mates) is then left out.
    Without ``places`` an image recorded in two batches gives its first record (:func:`evaluate` and its summary
    use the run's own batches). Records older than the ``batch`` field are taken as they are.
    """
    records: dict[int, dict] = {}
    for path in _records_files(Path(output)):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if places is None or record.get("batch", places.get(record["index"])) == places.get(record["index"]):
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


_DIST_TIMEOUT = timedelta(days=7)  # ranks wait for the slowest one before the summary


def default_device() -> torch.device:
    """``cuda`` where available, else ``cpu``. Under torchrun rank ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``
    modulo the GPUs present, so more ranks than GPUs share them."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join the ``torchrun`` process group for the ``with`` block and yield ``(rank, world)``; ``(0, 1)``
    outside torchrun. :func:`evaluate` shares its batches among the ranks. Only records cross ranks, so the
    group is gloo's whatever the device (NCCL would refuse several ranks on one GPU)."""
    joined = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("gloo", timeout=_DIST_TIMEOUT)
    try:
        yield _rank_world()
    finally:
        if joined:
            dist.destroy_process_group()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def evaluate(defended: DefendedModel, dataset: Dataset, attacks: Sequence[Attack], output: str | Path, *,
             settings: AttackSettings | None = None, indices: Sequence[int] | None = None, seed: int = 0,
             batch_size: int = 32, config: dict | None = None, progress: bool = True,
             run_missing: bool = True) -> dict | None:
    """Evaluate ``defended`` on ``dataset[indices]`` (default: all) under ``attacks``.

    ``indices`` are cut into batches of ``batch_size`` in order; a batch runs with seed ``seed`` + its first index
    (:func:`evaluate_batch`). Its per-image records, each naming its batch, go to ``output`` as soon as it is done;
    a rerun redoes the batches with a missing record (same batch, same seed, same results) and writes only the
    missing records. A run extended to more images redoes its earlier partial last batch whole (its records were
    made with other batch-mates and noise), so an extended run equals a fresh one. Under ``torch.distributed`` each
    rank takes every ``world``-th of those batches; rank 0 gathers the records and writes the summary. ``config``
    (JSON-able) joins the recorded run configuration. ``run_missing=False`` runs nothing and writes nothing: it
    checks the configuration and summarises the records there are. Returns the summary on rank 0, ``None`` on other
    ranks.
    """
    settings = settings or AttackSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _rank_world()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if len(set(indices)) != len(indices) or any(not 0 <= i < len(dataset) for i in indices):
        raise ValueError(f"indices must be distinct and in [0, {len(dataset)})")
    run_config = {**(config or {}), "attacks": [a.name for a in attacks], "settings": asdict(settings), "seed": seed,
                  "batch_size": batch_size, "runs": defended.runs, "vote": defended.vote,
                  "normalization": defended.normalization}
    _check_run_config(output, run_config, rank)
    batches = _batches(indices, batch_size)
    places = batch_places(indices, batch_size)
    done = load_records(output, places)
    _barrier()  # every rank has read the same finished set before any rank adds to it
    mine = [b for b in batches if run_missing and any(i not in done for i in b)][rank::world]
    new = _evaluate_batches(defended, dataset, mine, done, places, attacks, settings, seed, output, rank, progress)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(new, gathered, dst=0)
        new = [record for part in gathered or () for record in part]
    if rank != 0:
        return None
    records = {**done, **{r["index"]: r for r in new}}
    summary = {**summarize([records[i] for i in indices if i in records], attacks, run_config),
               "passes_per_prediction": defended.passes}
    if run_missing:
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (output / "summary.md").write_text(summary_markdown(summary))
    return summary


def _batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]


def batch_places(indices: Sequence[int], batch_size: int) -> dict[int, list[int]]:
    """index -> ``[first index of its batch, its position there, the batch's size]`` (a record's ``batch``) when
    ``indices`` are evaluated in batches of ``batch_size``; for :func:`load_records`."""
    return {i: [batch[0], position, len(batch)] for batch in _batches(indices, batch_size)
            for position, i in enumerate(batch)}


def _labelled(dataset: Dataset, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in batch]
    labels = torch.tensor([int(label) for _, label in items])
    if (labels < 0).any():
        index = batch[int((labels < 0).nonzero()[0])]
        raise ValueError(f"image {index} has no label (label {int(dataset[index][1])}): robust accuracy needs labels")
    return torch.stack([image for image, _ in items]), labels


def _evaluate_batches(defended: DefendedModel, dataset: Dataset, batches: list[list[int]], done: dict,
                      places: dict[int, list[int]], attacks: Sequence[Attack], settings: AttackSettings, seed: int,
                      output: Path, rank: int, progress: bool) -> list[dict]:
    records: list[dict] = []
    if not batches:
        return records
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"eval rank {rank}" if rank else "eval", position=rank,
               disable=not progress, dynamic_ncols=True, unit="image")
    with bar, _open_records(output, rank) as file:
        for batch in batches:
            images, labels = _labelled(dataset, batch)
            results = evaluate_batch(defended, images, labels, attacks, settings, seed + batch[0])
            new = [{"index": i, "batch": places[i], **r} for i, r in zip(batch, results, strict=True) if i not in done]
            file.write("".join(json.dumps(record) + "\n" for record in new))
            file.flush()
            os.fsync(file.fileno())
            records += new
            bar.update(len(batch))
            bar.set_postfix(clean=_mean(r["clean_correct"] for r in records),
                            robust=_mean(r["robust"] for r in records))
    return records


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(records: Sequence[dict], attacks: Sequence[Attack], config: dict | None = None) -> dict:
    """Accuracies and costs over per-image records (in [0, 1]; memory in MiB). Robust accuracy per threat
    model (Linf, L2; :func:`~purifytf.evaluation.report.threat_model`) is the per-image minimum over its attacks."""
    return {
        "images": len(records),
        "clean_accuracy": _mean(r["clean_correct"] for r in records),
        "robust_accuracy": {a.name: _mean(r["attacks"][a.name]["robust"] for r in records) for a in attacks},
        "robust_accuracy_overall": _mean(r["robust"] for r in records),
        "robust_accuracy_by_threat_model": {
            model: _mean(r["clean_correct"] and all(r["attacks"][a.name]["robust"] for a in attacks
                                                    if threat_model(a.name) == model) for r in records)
            for model in dict.fromkeys(threat_model(a.name) for a in attacks) if model is not None},
        "nfe_per_purification": _mean(r["nfe"] for r in records),
        "seconds_per_image": _mean(r["seconds"] for r in records),
        "peak_memory_mib": max((r["peak_memory_mib"] for r in records), default=float("nan")),
        "seeds": "base seed + first dataset index of the image's batch",
        "config": config or {},
    }


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table (accuracies in %)."""
    rows = [("clean", summary["clean_accuracy"])]
    rows += [(f"robust: {name}", acc) for name, acc in summary["robust_accuracy"].items()]
    rows.append(("robust: all attacks (per-image minimum)", summary["robust_accuracy_overall"]))
    lines = ["| accuracy | % |", "| --- | --- |", *(f"| {name} | {100 * acc:.2f} |" for name, acc in rows)]
    cost = (f"\n{summary['images']} images (seed {summary['config'].get('seed', '?')} + first index of each batch of "
            f"{summary['config'].get('batch_size', '?')}); "
            f"NFE per purification {summary['nfe_per_purification']:.1f}; "
            f"{summary['seconds_per_image']:.2f} s per image; peak memory {summary['peak_memory_mib']:.0f} MiB\n")
    return "\n".join(lines) + "\n" + cost
