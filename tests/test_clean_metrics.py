"""Clean-image metrics (purifytf.evaluation.clean) against values worked out by hand."""

import math

import pytest
import torch
from torch import nn

from purifytf.data import ArrayData
from purifytf.evaluation.clean import accuracy, psnr, purification_metrics
from purifytf.purifiers.classic import BitDepthPurify


def test_psnr_of_a_known_error():
    clean = torch.full((2, 1, 4, 4), 0.5)
    noisy = clean.clone()
    noisy[0] += 0.1  # MSE 0.01 -> 20 dB
    noisy[1, 0, 0, 0] += 0.4  # MSE 0.16 / 16 = 0.01 -> 20 dB
    assert psnr(noisy, clean).tolist() == pytest.approx([20.0, 20.0])
    assert psnr(clean + 0.7, clean).tolist() == pytest.approx([-10 * math.log10(0.25)] * 2)  # clamped to 1


class Brightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.3, else class 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.3
        return torch.cat([-m, m], 1) * self.scale


def test_purification_metrics_of_a_deterministic_purifier():
    # four flat images of classes 0, 1, 1, 1, all classified right; 1-bit reduction rounds 0.45 down to 0,
    # which the classifier then calls class 0: 3 of 4 right after purification
    values = torch.tensor([0.2, 0.45, 0.55, 0.9])
    images = values.view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    data = ArrayData(images, torch.tensor([0, 1, 1, 1]))
    model = Brightness()
    assert accuracy(model, data) == 1.0
    metrics = purification_metrics(BitDepthPurify(bits=1), data, {"m": model}, batch_size=3)
    rounded = torch.tensor([0.0, 0.0, 1.0, 1.0])
    expected_psnr = (10 * torch.log10(1 / (rounded - values).square())).mean().item()
    assert metrics == pytest.approx({"psnr": round(expected_psnr, 2), "m_clean_accuracy": 1.0,
                                     "m_accuracy_after_purification": 0.75})
