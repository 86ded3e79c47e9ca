"""DiffPurify: the uniform-noise diffusion purification baseline (DiffPure, Nie et al. 2022)."""

import functools

import torch
from torch import Tensor

from ..diffusion.backbones import Backbone
from ..diffusion.samplers import ddim_sample, timestep_grid
from ..inputs import check_choice
from ..random import randn_like
from .diffusion import DiffusionPurifier

__all__ = ["DiffPurify"]

_SAMPLER_ETA = {"ddpm": 1.0, "ddim": 0.0}


class DiffPurify(DiffusionPurifier):
    """Diffuse every pixel to one level ``t* = t_star * T``, then reverse to ``t = 0``.

    Reverse chain: ``"ddpm"`` (ancestral, the discrete chain of Lee & Kim's re-implementation) or
    ``"ddim"`` (deterministic), on ``steps`` equal steps (default: every step, ``t*`` network
    calls, i.e. 100 NFE at the reference ``t_star = 0.1``).

    Args:
        backbone: eps-prediction network.
        t_star: diffusion time in (0, 1] as a fraction of the schedule's T (DiffPure: 0.1 CIFAR-10,
            0.15 ImageNet); ``t_star * T`` must lie within the backbone's ``max_t``.
        steps: network calls in the reverse chain (``None``: one per step, ``round(t_star * T)``).
        sampler: ``"ddpm"`` or ``"ddim"``.
        checkpoint, seed: see :class:`DiffusionPurifier`.
    """

    def __init__(
        self,
        backbone: Backbone,
        t_star: float = 0.1,
        steps: int | None = None,
        sampler: str = "ddpm",
        checkpoint: bool = False,
        seed: int | None = None,
    ):
        super().__init__(backbone, checkpoint=checkpoint, seed=seed)
        if not 0 < t_star <= 1:
            raise ValueError(f"t_star must be in (0, 1], got {t_star}")
        check_choice("sampler", sampler, sorted(_SAMPLER_ETA))
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.t_star = t_star
        self.steps = steps
        self.sampler = sampler
        self.check_level(self.reference_level, self.reference_setting)

    @property
    def reference_level(self) -> int:
        return max(1, round(self.t_star * self.schedule.num_steps))

    @property
    def reference_setting(self) -> str:
        return f"t_star={self.t_star}"

    @property
    def num_steps(self) -> int:
        """Network calls per purification."""
        return self.steps or self.reference_level

    def denoise(self, x: Tensor, generator: torch.Generator | None, level_scale: Tensor | None = None) -> Tensor:
        t = self.reference_levels(x.shape[0], level_scale, x.device)
        x_t = self.schedule.q_sample(x, t, randn_like(x, generator))
        grid = timestep_grid(t, self.num_steps)
        randn = functools.partial(randn_like, generator=generator)
        return ddim_sample(self.schedule, self.eps, x_t, grid, eta=_SAMPLER_ETA[self.sampler], randn=randn)

    def _settings_repr(self) -> str:
        return f"t_star={self.t_star}, steps={self.num_steps}, sampler={self.sampler!r}"
