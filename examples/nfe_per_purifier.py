"""Network evaluations (NFE) per image of every purifier at its defaults.

Offline, on the exact oracle backbone and a tiny untrained CNN (NFE does not depend on weights):
    python examples/nfe_per_purifier.py
"""

import torch
from torch import nn

from purifytf import (
    BlurPurify,
    DiffPurify,
    IMPurify,
    JPEGPurify,
    OracleBackbone,
    SaliencyDiffPurify,
    SSNIPurify,
)

torch.manual_seed(0)
clean = torch.rand(8, 3, 32, 32)
backbone = OracleBackbone(clean)
classifier = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
)
ssni = SSNIPurify(DiffPurify(backbone), seed=0)
ssni.calibrate(clean)
purifiers = {
    "DiffPurify (t*=0.1, DDPM)": DiffPurify(backbone, seed=0),
    "SaliencyDiffPurify (spacing 20)": SaliencyDiffPurify(backbone, classifier, seed=0),
    "SaliencyDiffPurify (reference spacing 2)": SaliencyDiffPurify(backbone, classifier, spacing=2, seed=0),
    "SSNIPurify (on DiffPurify, T'=20)": ssni,
    "IMPurify (tiny)": IMPurify(preset="tiny", in_channels=3, seed=0),
    "JPEGPurify": JPEGPurify(),
    "BlurPurify": BlurPurify(),
}
x = (clean + 0.03 * torch.randn_like(clean)).clamp(0, 1)
print("| purifier | NFE per image |\n| --- | --- |")
for name, purifier in purifiers.items():
    purifier(x)
    print(f"| {name} | {purifier.last_nfe} |")
