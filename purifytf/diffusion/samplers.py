"""Reverse-diffusion steps and timestep grids, batched with a timestep per sample.

Timesteps follow :mod:`purifytf.diffusion.schedule`: ``t`` forward steps, ``0`` is clean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..functional import straight_through
from .schedule import NoiseSchedule

__all__ = ["ddim_step", "timestep_grid", "ddim_sample", "EpsFn", "PrepareFn"]

EpsFn = Callable[[Tensor, Tensor], Tensor]
"""``eps(x_t, t)``: ``x_t`` (B,C,H,W) in model space, ``t`` (B,) steps -> predicted noise."""

PrepareFn = Callable[[int, Tensor, Tensor], "tuple[Tensor, Tensor]"]
"""``prepare(i, x_t, t) -> (x_t', t')``: edits the state before network call ``i`` (e.g. re-noising)."""


def ddim_step(
    schedule: NoiseSchedule,
    x_t: Tensor,
    eps: Tensor,
    t: Tensor,
    tau: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip: bool = True,
) -> Tensor:
    """One generalised DDIM step ``t -> tau`` (``tau < t``), per-sample ``t``/``tau`` of shape (B,).

    ``x_tau = sqrt(abar_tau) x0_hat + sqrt(1 - abar_tau - sigma^2) eps' + sigma z`` with
    ``sigma = eta sqrt((1-abar_tau)/(1-abar_t)) sqrt(1 - abar_t/abar_tau)``. ``eta = 0`` is DDIM
    (``eps' = eps``, the network's noise, as ALGORITHMS.md writes it). ``eta > 0`` uses the noise the
    clamped ``x0_hat`` implies, ``eps' = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``, so ``eta = 1``
    samples the DDPM posterior ``q(x_tau | x_t, x0_hat)`` exactly, clamping included (guided-diffusion's
    ``p_sample``, Lee & Kim's DDPM chain; ancestral step, fixed-small variance), which is the DDPM step
    when ``tau = t - 1``.
    """
    abar_t = schedule.alpha_bar(t, like=x_t)
    abar_tau = schedule.alpha_bar(tau, like=x_t)
    x0 = schedule.predict_x0(x_t, t, eps, clip=clip)
    if eta == 0:
        return abar_tau.sqrt() * x0 + (1 - abar_tau).sqrt() * eps
    if noise is None:
        raise ValueError("a stochastic step (eta > 0) needs noise")
    implied = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    var = eta**2 * (1 - abar_tau) / (1 - abar_t) * (1 - abar_t / abar_tau)
    return abar_tau.sqrt() * x0 + _sqrt0(1 - abar_tau - var) * implied + _sqrt0(var) * noise


def _sqrt0(v: Tensor) -> Tensor:
    """``sqrt(max(v, 0))`` with a zero (not infinite) derivative at 0, e.g. at the final step ``tau = 0``."""
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive


def timestep_grid(t_start: Tensor, steps: int, t_end: Tensor | int = 0) -> Tensor:
    """Descending grid ``(steps + 1, B)`` from ``t_start`` to ``t_end`` per sample.

    ``ceil(linspace(t_end, t_start, steps + 1))`` reversed: every sample takes the same number of
    steps on its own grid. A float ``t_start`` (with gradient) keeps a straight-through gradient:
    forward values are the integer grid, the backward pass sees the linspace.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_start = torch.as_tensor(t_start)
    t_end = torch.as_tensor(t_end, device=t_start.device).expand_as(t_start)
    k = torch.arange(steps, -1, -1, device=t_start.device, dtype=torch.float64)[:, None]
    grid = t_end.double() + (t_start.double() - t_end.double()) * k / steps  # exact on integer points
    if t_start.is_floating_point() and t_start.requires_grad:
        return straight_through(grid.detach().ceil(), grid)
    return grid.ceil().long()


def ddim_sample(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x_t: Tensor,
    grid: Tensor,
    eta: float = 0.0,
    randn: Callable[[Tensor], Tensor] | None = None,
    prepare: PrepareFn | None = None,
) -> Tensor:
    """Run the reverse chain over ``grid`` (``(K + 1, B)``), one network call per step.

    Args:
        x_t: (B,C,H,W) state at ``grid[0]``, model space.
        randn: ``randn(like) -> noise`` for stochastic steps (``eta > 0``).
        prepare: optional hook applied before each network call (see :data:`PrepareFn`).
    Returns:
        (B,C,H,W) state at ``grid[-1]`` (``x_0`` when the grid ends at 0).
    """
    for i in range(grid.shape[0] - 1):
        t, tau = grid[i], grid[i + 1]
        if prepare is not None:
            x_t, t = prepare(i, x_t, t)
        noise = randn(x_t) if eta > 0 else None
        x_t = ddim_step(schedule, x_t, eps_fn(x_t, t), t, tau, eta=eta, noise=noise)
    return x_t
