"""Supervised classifier recipe: cross-entropy with random translations and horizontal flips."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..evaluation.clean import accuracy
from ..models import AllConvNet
from ..random import rand_like
from .loop import OptimConfig, Trainer

__all__ = ["ClassifierTrainer", "augment", "heldout_cache", "train_heldout_classifier"]


def augment(x: Tensor, generator: torch.Generator | None, shift: int = 2, flip: bool = True) -> Tensor:
    """Per-image random integer translation by up to ``shift`` pixels (zero fill) and left-right flip.

    ``x`` (B, C, H, W) -> same shape; exact pixel moves (nearest sampling), draws from ``generator``.
    """
    b, _, h, w = x.shape
    offsets = (rand_like(x.new_empty(b, 2), generator) * (2 * shift + 1)).floor() - shift
    sign = torch.where(rand_like(x.new_empty(b), generator) < 0.5, -1.0, 1.0) if flip else x.new_ones(b)
    theta = x.new_zeros(b, 2, 3)
    theta[:, 0, 0] = sign
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * offsets[:, 0] / w
    theta[:, 1, 2] = -2 * offsets[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class ClassifierTrainer(Trainer):
    """Trains ``model`` (logits from [0, 1] images) with cross-entropy on augmented batches."""

    desc = "classifier"

    def __init__(self, model: nn.Module, data: Dataset, config: OptimConfig, shift: int = 2, flip: bool = True):
        super().__init__(model, model, data, config)
        self.shift = shift
        self.flip = flip

    def losses(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        logits = self.network(augment(images, generator, self.shift, self.flip))
        return {"ce": F.cross_entropy(logits, labels)}

    def recipe_settings(self) -> dict[str, object]:
        return {"shift": self.shift, "flip": self.flip}


def heldout_cache(steps: int = 1500, seed: int = 0) -> Path:
    """Where :func:`train_heldout_classifier` keeps its network (``~/.cache/purifytf/heldout/allconv-STEPS-SEED``)."""
    return Path.home() / ".cache" / "purifytf" / "heldout" / f"allconv-{steps}-{seed}"


def train_heldout_classifier(data: Callable[[str], Dataset], steps: int = 1500, seed: int = 0,
                             cache: Path | None = None) -> AllConvNet:
    """The held-out classifier: an :class:`~purifytf.models.AllConvNet` trained by this module's recipe (AdamW
    lr 2e-3, 100 warm-up steps, batch 128, seed ``seed``) on ``data("train")``, used by no purifier's training or
    tuning. With ``cache`` (e.g. :func:`heldout_cache`) it is saved there with ``metrics.json`` (accuracy on
    ``data("test")``, seconds) and loaded from there on later calls, without calling ``data``. Eval mode."""
    if cache is not None and (cache / "model.safetensors").exists():
        return AllConvNet.from_pretrained(cache).eval()
    train = data("train")
    torch.manual_seed(seed)
    model = AllConvNet(in_channels=train[0][0].shape[0])
    config = OptimConfig(steps=steps, batch_size=128, lr=2e-3, warmup_steps=min(100, steps // 10), weight_decay=0.05,
                         betas=(0.9, 0.999), seed=seed, checkpoint_every=10**9)
    start = time.perf_counter()
    ClassifierTrainer(model, train, config).fit(None, progress=False)
    if cache is not None:
        model.save_pretrained(cache)
        metrics = {"architecture": "AllConvNet", "seed": seed, "steps": steps, "batch_size": 128,
                   "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                   "test_accuracy": accuracy(model, data("test"))}
        (cache / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return model.eval()
