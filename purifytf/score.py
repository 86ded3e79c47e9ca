"""Expected perturbation score (EPS): how far a sample lies from the data, seen by a diffusion model.

``EPS(x) = (1/T') sum_{k=1..T'} s(x_k, k)`` with ``x_k = q_sample(x, k, z_k)`` and ``s`` the model's
score (Zhang et al. 2023; used by SSNI to pick a noise level per sample).
"""

import torch
from torch import Tensor

from .diffusion.samplers import EpsFn
from .diffusion.schedule import NoiseSchedule
from .random import randn_like

__all__ = ["expected_perturbation_score"]


def expected_perturbation_score(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x: Tensor,
    num_steps: int,
    generator: torch.Generator | None,
) -> Tensor:
    """EPS of ``x`` (B,C,H,W) in model space [-1, 1] over levels ``k = 1..num_steps``; returns (B,C,H,W).

    One network call per level on the whole batch, summed as it goes: without gradients, memory is that
    of a single call whatever ``num_steps`` (with them, autograd keeps every call's graph). Each ``z_k``
    is one (1,C,H,W) draw shared by the batch (common random numbers), so a sample's EPS depends on the
    sample and the generator only, not on its batch-mates.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    total = torch.zeros_like(x)
    for k in range(1, num_steps + 1):
        t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x_k = schedule.q_sample(x, t, randn_like(x[:1], generator))
        total = total + schedule.eps_to_score(eps_fn(x_k, t), t)
    return total / num_steps
