"""Variance-preserving noise schedules.

Convention: a timestep ``t`` counts forward diffusion steps, ``t in [0, T]``;
``alpha_bar(0) = 1`` (clean) and ``alpha_bar(t) = prod_{s=1..t} (1 - beta_s)``.
Networks trained in the DDPM / diffusers convention take the 0-based index
``t - 1`` (see :func:`network_timestep`).

Timesteps may be integers, or floats (``alpha_bar`` is then interpolated
linearly in ``log alpha_bar``, exact on integers, so a straight-through
estimator can differentiate a per-sample noise level). Shapes: a timestep per
sample ``(B,)`` broadcasts over ``(B, C, H, W)``; a timestep map ``(B, 1, H, W)``
is used as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NoiseSchedule", "network_timestep"]


def network_timestep(t: Tensor) -> Tensor:
    """Map a step count ``t in [1, T]`` to the 0-based index DDPM networks were trained on."""
    return t - 1


class NoiseSchedule(nn.Module):
    """``alpha_bar`` table of a VP diffusion with ``T`` steps, plus the closed-form maps on it.

    Args:
        alphas_cumprod: ``(T,)`` cumulative products ``alpha_bar(1..T)``, decreasing in ``(0, 1)``.
    """

    def __init__(self, alphas_cumprod: Sequence[float] | Tensor):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device="cpu").flatten()  # also under meta
        if abar.numel() < 1 or not torch.all((abar > 0) & (abar <= 1)):
            raise ValueError("alphas_cumprod must be a non-empty vector of values in (0, 1]")
        if torch.any(abar[1:] > abar[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing")
        table = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), abar])  # index t -> alpha_bar(t), t = 0..T
        self.register_buffer("_log_abar", table.log(), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves with the module but keeps the float64 table (``.half()`` must not round it)."""
        table = self._log_abar
        super()._apply(fn, recurse)
        self._log_abar = table.to(self._log_abar.device)
        return self

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        """The DDPM linear schedule (Ho et al.): ``beta = linspace(beta_start, beta_end, T)``."""
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")
        return cls(torch.cumprod(1 - betas, 0))

    @property
    def num_steps(self) -> int:
        return self._log_abar.numel() - 1

    @property
    def alphas_cumprod(self) -> Tensor:
        """``(T,)`` float64 ``alpha_bar(1..T)`` (what ``__init__`` takes)."""
        return self._log_abar[1:].exp()

    def alpha_bar(self, t: Tensor | int | float, like: Tensor | None = None) -> Tensor:
        """``alpha_bar(t)``, broadcastable against ``like`` (``(B,)`` t becomes ``(B,1,1,1)``)."""
        t = torch.as_tensor(t, device=self._log_abar.device)
        if t.is_floating_point():
            t = t.clamp(0, self.num_steps)
            lo = t.detach().floor().long().clamp(max=self.num_steps - 1)
            frac = t - lo
            log_abar = torch.lerp(self._log_abar[lo], self._log_abar[lo + 1], frac.to(torch.float64))
        else:
            # compiled code skips this data-dependent check (a graph break per call); indexing still bounds-checks
            if not torch.compiler.is_compiling() and torch.any((t < 0) | (t > self.num_steps)):
                raise ValueError(f"timesteps must lie in [0, {self.num_steps}]")
            log_abar = self._log_abar[t]
        abar = log_abar.exp()
        if like is not None:
            if like.device != abar.device:
                abar = abar.to(like.device)
            if abar.dim() == 1 and like.dim() > 1:
                abar = abar.view(-1, *([1] * (like.dim() - 1)))
            return abar.to(like.dtype)
        return abar.float()

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Sample ``q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)`` with the given noise."""
        abar = self.alpha_bar(t, like=x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_jump(self, x_s: Tensor, s: Tensor | int, t: Tensor | int, noise: Tensor) -> Tensor:
        """Forward-diffuse an ``x_s`` to a later step ``t >= s``: ``q(x_t | x_s)``.

        Folds ``t - s`` single forward steps ``x <- sqrt(alpha) x + sqrt(beta) z`` into one draw.
        """
        ratio = self.alpha_bar(t, like=x_s) / self.alpha_bar(s, like=x_s)
        return ratio.sqrt() * x_s + (1 - ratio).clamp_min(0).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor | int, eps: Tensor, clip: bool = True) -> Tensor:
        """Tweedie / one-step estimate ``(x_t - sqrt(1-abar) eps) / sqrt(abar)``, clamped to [-1, 1]."""
        abar = self.alpha_bar(t, like=x_t)
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        return x0.clamp(-1, 1) if clip else x0

    def eps_to_score(self, eps: Tensor, t: Tensor | int) -> Tensor:
        """Score ``grad log p_t(x_t) = -eps / sqrt(1 - abar_t)``."""
        return -eps / (1 - self.alpha_bar(t, like=eps)).sqrt()

    def score_to_eps(self, score: Tensor, t: Tensor | int) -> Tensor:
        """Inverse of :meth:`eps_to_score`."""
        return -score * (1 - self.alpha_bar(t, like=score)).sqrt()

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"
