"""Quick start: DiffPurify inside a torchvision v2 pipeline.

Runs offline on the exact oracle backbone (the optimal denoiser of a small reference set), so it
needs no downloaded weights:  python examples/quickstart.py
"""

import torch
from torchvision.transforms import v2

from purifytf import DiffPurify, OracleBackbone

references = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
purifier = DiffPurify(OracleBackbone(references), t_star=0.1, steps=10, sampler="ddim", seed=0)

pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), purifier])
image = (references[3] * 255).round().to(torch.uint8)  # (3, 32, 32) uint8, like a decoded file
noisy = (image.float() + torch.randn(image.shape) * 20).clamp(0, 255).to(torch.uint8)
purified, label = pipeline((noisy, 3))
print(f"purified {tuple(purified.shape)} with {purifier.last_nfe} network calls; label {label}")
print(f"distance to the clean image: before {((noisy / 255) - references[3]).abs().mean():.3f}, "
      f"after {(purified - references[3]).abs().mean():.3f}")
