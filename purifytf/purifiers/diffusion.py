"""Shared machinery of purifiers built on a diffusion backbone."""

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..base import Purifier
from ..diffusion.backbones import Backbone
from ..diffusion.schedule import NoiseSchedule, network_timestep
from ..nfe import record_nfe

__all__ = ["DiffusionPurifier"]


class DiffusionPurifier(Purifier):
    """A purifier that diffuses its input and runs a reverse chain with ``backbone``.

    Subclasses implement :meth:`denoise` in model space [-1, 1]. ``level_scale`` (B,) lets a
    wrapper (SSNI) rescale every noise level of the method per sample, relative to
    :attr:`reference_level`.

    Args:
        backbone: eps-prediction network (:class:`~purifytf.diffusion.Backbone`).
        checkpoint: recompute network activations in the backward pass (gradient checkpointing),
            so full-gradient attacks through many network calls fit in memory.
        seed: see :class:`~purifytf.Purifier`.
    """

    _abstract_config = True

    def __init__(self, backbone: Backbone, checkpoint: bool = False, seed: int | None = None):
        super().__init__(seed=seed)
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a purifytf Backbone (see purifytf.diffusion), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.checkpoint = checkpoint

    @property
    def schedule(self) -> NoiseSchedule:
        return self.backbone.schedule

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    @property
    def sample_size(self) -> tuple[int, int] | None:
        return self.backbone.sample_size

    @property
    def min_size(self) -> int:
        return self.backbone.min_size

    @property
    def reference_level(self) -> int:
        """The noise level (steps) that ``level_scale = 1`` means; what SSNI reweights."""
        raise NotImplementedError

    def check_level(self, level: float, setting: str) -> None:
        """Refuse a noise level (``level`` steps, from ``setting``) beyond the backbone's trained ``max_t``."""
        if level > self.backbone.max_t:
            T = self.schedule.num_steps
            raise ValueError(f"{setting} asks for noise level {level:g} steps ({level / T:g} of T = {T}), beyond "
                             f"the backbone's trained range max_t = {self.backbone.max_t} ({self.backbone.max_t / T:g}"
                             f" of T)")

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """One counted network call: ``x_t`` (B,C,H,W) in [-1, 1], ``t`` (B,) steps -> eps."""
        record_nfe()
        net_t = network_timestep(t).to(x_t.dtype if t.is_floating_point() else t.dtype)
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint_call(self.backbone, x_t, net_t, use_reentrant=False)
        return self.backbone(x_t, net_t)

    def denoise(self, x: Tensor, generator: torch.Generator | None, level_scale: Tensor | None = None) -> Tensor:
        """Purify ``x`` (B,C,H,W) in model space [-1, 1]; returns the same shape and space."""
        raise NotImplementedError

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return (self.denoise(x * 2 - 1, generator) + 1) / 2

    def levels(self, base: float, batch: int, level_scale: Tensor | None, device: torch.device) -> Tensor:
        """Per-sample noise level (B,) in steps: ``round(base * level_scale)``, at least 1.

        Integer steps without ``level_scale``; with a ``level_scale`` that carries gradient the
        rounding is straight-through (float steps whose forward value is the integer).
        """
        if level_scale is None:
            return torch.full((batch,), round(base), device=device, dtype=torch.long)
        t = (base * level_scale.to(device)).clamp(1, self.schedule.num_steps)
        if level_scale.requires_grad:
            return t + (t.detach().round() - t.detach())
        return t.round().long()
