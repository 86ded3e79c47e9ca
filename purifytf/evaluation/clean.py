"""Clean-image metrics: a classifier's accuracy, and what a purifier costs on clean images (PSNR, accuracy)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import ArrayData

__all__ = ["accuracy", "psnr", "purification_metrics"]


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(image, label)`` data."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for images, labels in DataLoader(data, batch_size=batch_size):
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
    return correct / len(data)


def psnr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR (N,) in dB of (N, C, H, W) images in [0, 1] (``estimate`` clamped to [0, 1] first)."""
    mse = (estimate.clamp(0, 1) - reference).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def purification_metrics(purifier: nn.Module, data: ArrayData, classifiers: Mapping[str, nn.Module],
                         generator: torch.Generator | None = None, batch_size: int = 500) -> dict[str, float]:
    """One purification of each image of ``data`` (labelled, in [0, 1]) drawn from ``generator``: the mean
    per-image ``psnr`` of the output to the clean image, and for each named classifier its
    ``{name}_clean_accuracy`` and ``{name}_accuracy_after_purification``."""
    device = next(purifier.parameters(), torch.empty(0)).device
    purified = torch.cat([purifier.purify(x.to(device), generator).cpu()
                          for x in data.images.split(batch_size)]).clamp(0, 1)
    metrics = {"psnr": round(psnr(purified, data.images).mean().item(), 2)}
    for name, model in classifiers.items():
        metrics[f"{name}_clean_accuracy"] = accuracy(model, data, batch_size)
        metrics[f"{name}_accuracy_after_purification"] = accuracy(model, ArrayData(purified, data.labels), batch_size)
    return metrics
