"""Shared machinery of purifiers built on a diffusion backbone: one pipeline, one place noise levels come from."""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..base import Purifier
from ..diffusion.backbones import Backbone
from ..diffusion.schedule import NoiseSchedule
from ..functional import straight_through, to_image_space, to_model_space
from ..nfe import record_nfe
from ..score import expected_perturbation_score

__all__ = ["DiffusionPurifier", "LevelRule"]

LevelRule = Callable[[Tensor, "torch.Generator | None"], Tensor]
"""``rule(x_d, generator) -> (B,)``: a per-sample factor on every noise level of a diffusion purifier, from
the image in model space (SSNI's score-norm rule, :class:`~purifytf.SSNIPurify`)."""


class DiffusionPurifier(Purifier):
    """A purifier that diffuses its input and runs a reverse chain with ``backbone``.

    :meth:`run` is the one pipeline: the image in [0, 1] goes to model space [-1, 1] once, whatever
    the method needs from the image itself (:meth:`condition`, e.g. a saliency mask) is computed once
    in [0, 1], and the noise level comes from one place: the configured constant level (DiffPure), or a
    per-sample :data:`LevelRule` (SSNI's score-norm rule) whose factor ``level_scale`` (B,) rescales
    every level of the method relative to :attr:`reference_level`. Subclasses implement
    :meth:`denoise` in model space.

    Noise levels: settings are fractions of the schedule's T; internally steps. A level beyond the
    backbone's trained range ``backbone.max_t`` is refused (:meth:`check_level`).

    Args:
        backbone: eps-prediction network (:class:`~purifytf.diffusion.Backbone`).
        checkpoint: recompute network activations in the backward pass (gradient checkpointing),
            so full-gradient attacks through many network calls fit in memory.
        seed: see :class:`~purifytf.Purifier`.

    Attributes:
        last_t: (B,) long, the noise level (steps) each sample of the last call was diffused to: the
            :attr:`reference_level`, rescaled per sample under a level rule.
    """

    _abstract_config = True

    def __init__(self, backbone: Backbone, checkpoint: bool = False, seed: int | None = None):
        super().__init__(seed=seed)
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a purifytf Backbone (see purifytf.diffusion), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.last_t: Tensor | None = None

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

    @property
    def reference_setting(self) -> str:
        """The setting that fixes :attr:`reference_level`, for messages (``"t_star=0.1"``)."""
        raise NotImplementedError

    @property
    def level_overshoot(self) -> int:
        """Steps above the diffusion level at which the method calls its network (SaliencyDiffPurify's
        resampling); :meth:`check_level` counts them."""
        return 0

    def check_level(self, level: float, setting: str) -> None:
        """Refuse a noise level (``level`` steps, from ``setting``) whose network calls, up to ``level +``
        :attr:`level_overshoot`, go beyond the backbone's trained ``max_t``."""
        if level + self.level_overshoot > self.backbone.max_t:
            T = self.schedule.num_steps
            over = f" (+ {self.level_overshoot} resampling steps)" if self.level_overshoot else ""
            raise ValueError(f"{setting} asks for noise level {level:g} steps ({level / T:g} of T = {T}){over}, "
                             f"beyond the backbone's trained range max_t = {self.backbone.max_t} "
                             f"({self.backbone.max_t / T:g} of T)")

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """One counted network call: ``x_t`` (B,C,H,W) in [-1, 1], ``t`` (B,) steps -> eps in ``x_t``'s dtype
        (under autocast the network computes in bf16/fp16; the sampler and the score stay in float32)."""
        record_nfe()
        net_t = t.to(x_t.dtype) if t.is_floating_point() else t
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint_call(self.backbone, x_t, net_t, use_reentrant=False).to(x_t.dtype)
        return self.backbone(x_t, net_t).to(x_t.dtype)

    def expected_score(self, x: Tensor, num_steps: int, generator: torch.Generator | None) -> Tensor:
        """Expected perturbation score (B,C,H,W) of ``x`` in model space over levels ``1..num_steps`` (NFE
        ``num_steps``; :func:`~purifytf.score.expected_perturbation_score` with this purifier's network)."""
        return expected_perturbation_score(self.schedule, self.eps, x, num_steps, generator)

    def condition(self, x: Tensor) -> dict[str, Tensor]:
        """What :meth:`denoise` takes from the image ``x`` (B,C,H,W) in [0, 1] itself (none here)."""
        return {}

    def denoise(self, x: Tensor, generator: torch.Generator | None, level_scale: Tensor | None = None) -> Tensor:
        """Purify ``x`` (B,C,H,W) in model space [-1, 1]; returns the same shape and space."""
        raise NotImplementedError

    def run(self, x: Tensor, generator: torch.Generator | None, rule: LevelRule | None = None) -> Tensor:
        """Purify ``x`` (B,C,H,W) in [0, 1] at the levels of ``rule`` (``None``: the configured constant level)."""
        x_d = to_model_space(x)
        level_scale = None if rule is None else rule(x_d, generator)
        return to_image_space(self.denoise(x_d, generator, level_scale, **self.condition(x)))

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.run(x, generator)

    def reference_levels(self, batch: int, level_scale: Tensor | None, device: torch.device) -> Tensor:
        """The level (B,) each sample is diffused to (:meth:`levels` of :attr:`reference_level`), recorded as
        :attr:`last_t`; what :meth:`denoise` diffuses with. A constant level is checked against ``max_t``."""
        if level_scale is None:
            self.check_level(self.reference_level, self.reference_setting)
        t = self.levels(self.reference_level, batch, level_scale, device)
        self.last_t = t.detach().round().long()
        return t

    def levels(self, base: float, batch: int, level_scale: Tensor | None, device: torch.device) -> Tensor:
        """Per-sample noise level (B,) in steps: ``round(base * level_scale)``, at least 1 and at most the
        backbone's trained range (``max_t`` less :attr:`level_overshoot`: a rule asking for more is held there).

        Integer steps without ``level_scale``; with a ``level_scale`` that carries gradient the
        rounding is straight-through (float steps whose forward value is the integer).
        """
        if level_scale is None:
            return torch.full((batch,), round(base), device=device, dtype=torch.long)
        t = (base * level_scale.to(device)).clamp(1, max(1, self.backbone.max_t - self.level_overshoot))
        if level_scale.requires_grad:
            return straight_through(t.detach().round(), t)
        return t.round().long()
