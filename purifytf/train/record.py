"""The training record of a run that may span several sittings: what trained, where, for how long.

A sitting is ``{labels..., "steps": [start, stop], "seconds", "threads", "device"}``; a run keeps its sittings in a
JSON list beside its checkpoint (``sittings.json``) so that a resumed run adds to them, and its ``metrics.json``
sums them. A sitting is logged at each checkpoint, so one killed on the way is recorded up to its last checkpoint
(the steps a resumed run continues from).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["device_name", "fit_sitting", "machine", "read_sittings"]


def device_name(device: torch.device | str) -> str:
    """``device`` as recorded: ``cpu``, or ``cuda:0 (NVIDIA H200)`` with the GPU's name."""
    device = torch.device(device)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def machine() -> str:
    """This machine as recorded: ``x86_64, 2 cores, torch 2.15.0``."""
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def read_sittings(log: Path, resume: bool) -> list[dict]:
    """The sittings logged so far in ``log`` (a JSON list) when resuming, else none."""
    return json.loads(log.read_text()) if resume and log.exists() else []


def sitting(trainer, start_step: int, start: float, device: torch.device | str, **labels) -> dict:
    """The record of the steps ``trainer`` took since ``start_step``, begun at ``time.perf_counter()`` ``start``."""
    return {**labels, "steps": [start_step, trainer.step], "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "device": device_name(device)}


def fit_sitting(trainer, directory: Path, stop: int, log: Path, sittings: list[dict], device: torch.device | str,
                progress: bool = True, **labels) -> None:
    """Train ``trainer`` to step ``stop``, checkpointing to ``directory``; a sitting that trained appends its record
    (:func:`sitting`, with ``labels``) to ``sittings`` and writes them to ``log``, at each checkpoint."""
    start_step, start, before = trainer.step, time.perf_counter(), list(sittings)

    def record() -> None:
        if trainer.step > start_step:  # a sitting that only re-exports adds nothing
            sittings[:] = [*before, sitting(trainer, start_step, start, device, **labels)]
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(json.dumps(sittings, indent=1) + "\n")

    trainer.fit(directory, stop=stop, progress=progress, on_checkpoint=record)
