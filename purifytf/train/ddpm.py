"""DDPM recipe (Ho et al., 2020): eps-prediction with the simple loss, uniform t, EMA of the weights.

The checkpoint's ``model.safetensors`` holds the EMA weights (the product, a backbone state dict that
:func:`purifytf.hub.load_backbone` loads with ``strict=True``) and ``config.json`` the backbone config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..diffusion.backbones import Backbone
from ..functional import to_model_space
from ..random import rand_like, randn_like
from .loop import OptimConfig, Trainer

__all__ = ["DDPMTrainer", "denoising_psnr"]


def _noised(backbone: Backbone, x0: Tensor, generator: torch.Generator | None, t: Tensor | None = None,
            max_t: int | None = None, t_power: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, t, eps)`` for model-space ``x0`` (B, C, H, W) in [-1, 1]; ``t`` (B,) if not given: ``1 + floor(u **
    t_power * max_t)``, u uniform in [0, 1) (``t_power`` 1: uniform on [1, max_t]; above 1: weighted towards small t,
    P(t <= s) = (s / max_t) ** (1 / t_power)). ``max_t`` defaults to the schedule's ``T``.
    """
    if t is None:
        max_t = backbone.schedule.num_steps if max_t is None else max_t
        u = rand_like(x0.new_empty(len(x0)), generator)
        t = (1 + (u.pow(t_power) * max_t).long()).clamp(max=max_t)
    eps = randn_like(x0, generator)
    return backbone.schedule.q_sample(x0, t, eps), t, eps


class DDPMTrainer(Trainer):
    """Trains a :class:`~purifytf.diffusion.Backbone` to predict the noise of ``q(x_t | x_0)``.

    Args:
        backbone: the network (trained in place); its EMA copy is what checkpoints save.
        data: ``(image (C, H, W) in [0, 1], label)`` pairs (labels unused).
        config: :class:`OptimConfig`.
        ema_decay: EMA decay per step (``0``: save the trained weights themselves).
        max_t: train on schedule steps in ``[1, max_t]`` (default: all ``T``); the network is valid only up
            to ``max_t``, which the saved config records as ``max_t``.
        t_power: the timestep distribution on ``[1, max_t]``: 1 uniform, above 1 weighted towards small t
            (``t = 1 + floor(u ** t_power * max_t)``; 2 puts half the steps below ``max_t / 4``).
    """

    desc = "ddpm"

    def __init__(self, backbone: Backbone, data: Dataset, config: OptimConfig, ema_decay: float = 0.999,
                 max_t: int | None = None, t_power: float = 1.0):
        num_steps = backbone.schedule.num_steps
        if max_t is not None and not 1 <= max_t <= num_steps:
            raise ValueError(f"max_t must be in [1, {num_steps}], got {max_t}")
        if t_power <= 0:
            raise ValueError(f"t_power must be positive, got {t_power}")
        ema = copy.deepcopy(backbone).eval().requires_grad_(False)
        super().__init__(ema, backbone, data, config)
        self.ema_decay = ema_decay
        self.max_t = num_steps if max_t is None else max_t
        self.t_power = t_power

    def losses(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        x_t, t, eps = _noised(self.network, to_model_space(images), generator, max_t=self.max_t, t_power=self.t_power)
        return {"mse": F.mse_loss(self.network(x_t, t), eps)}

    @torch.no_grad()
    def after_step(self) -> None:
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))  # short warm-up of the average
        for average, live in zip(self.model.parameters(), self.network.parameters(), strict=True):
            average.lerp_(live, 1 - decay)
        for average, live in zip(self.model.buffers(), self.network.buffers(), strict=True):
            average.copy_(live)

    def save_model(self, directory: Path) -> None:
        self.model.max_t = self.max_t  # the trained range travels in config.json
        self.model.save_pretrained(directory)

    def extra_state(self) -> dict[str, object]:
        return {"network": self.network.state_dict()}

    def recipe_settings(self) -> dict[str, object]:
        return {"ema_decay": self.ema_decay, "max_t": self.max_t, "t_power": self.t_power}

    def load_extra_state(self, state: dict[str, object]) -> None:
        self.network.load_state_dict(state["network"])


@torch.no_grad()
def denoising_psnr(backbone: Backbone, images: Tensor, t: int, generator: torch.Generator | None = None,
                   batch_size: int = 250) -> float:
    """PSNR (dB, images in [0, 1]) of the one-step Tweedie estimate of ``images`` (N, C, H, W) from ``x_t``."""
    backbone.eval()
    device = backbone.schedule.alphas_cumprod.device
    squared_error = 0.0
    for x in images.split(batch_size):
        x0 = to_model_space(x.to(device))
        steps = torch.full((len(x0),), t, device=x0.device)
        x_t, _, _ = _noised(backbone, x0, generator, steps)
        estimate = backbone.schedule.predict_x0(x_t, steps, backbone(x_t, steps))
        squared_error += ((estimate - x0) / 2).square().sum().item()
    mse = squared_error / images.numel()
    return float(10 * torch.log10(torch.tensor(1.0 / mse)))
