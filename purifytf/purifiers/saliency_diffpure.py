"""SaliencyDiffPurify: heterogeneous noise where the classifier looks (Pei et al., CVPR 2025, arXiv 2503.01407)."""

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..base import input_channels
from ..diffusion.backbones import Backbone
from ..diffusion.samplers import EpsFn, ddim_sample, timestep_grid
from ..diffusion.schedule import NoiseSchedule
from ..functional import straight_through, to_image_space
from ..inputs import check_choice
from ..random import randn_like
from ..saliency import StageFeatures, activation_saliency, threshold_mask, topk_mask
from .diffusion import DiffusionPurifier

__all__ = ["SaliencyDiffPurify", "heterogeneous_ddim", "level_map"]

_MASKS = ("threshold", "topk", "continuous")


def level_map(mask: Tensor, grid: Tensor) -> Tensor:
    """Per-pixel noise level ``t_s + mask (t_l - t_s)`` snapped to the nearest point of ``grid``.

    Args:
        mask: (B, 1, H, W) in [0, 1] (binary mask or saliency).
        grid: (n + 1, B) descending stage-1 grid from ``t_l`` (``grid[0]``) to ``t_s`` (``grid[-1]``).
    Returns:
        (B, 1, H, W) levels on ``grid``; straight-through (gradient of the unsnapped map) when
        ``mask`` or ``grid`` carries gradient.
    """
    t_l, t_s = grid[0].view(-1, 1, 1, 1), grid[-1].view(-1, 1, 1, 1)
    raw = t_s + mask * (t_l - t_s)
    target = raw.detach()
    snapped = t_l.detach().expand(raw.shape)
    for level in grid[1:].detach():
        level = level.view(-1, 1, 1, 1)
        snapped = torch.where((target - level).abs() < (target - snapped).abs(), level, snapped)
    return straight_through(snapped, raw)


def heterogeneous_ddim(
    schedule: NoiseSchedule,
    eps_fn: EpsFn,
    x: Tensor,
    t_map: Tensor,
    grid: Tensor,
    stage1_steps: int,
    resample_steps: int = 0,
    randn: Callable[[Tensor], Tensor] = torch.randn_like,
) -> Tensor:
    """Diffuse each pixel of ``x`` to its own level ``t_map`` and reverse all of them with one DDIM chain.

    ``x_known = q_sample(x, t_map, z_0)`` (the first draw) is the start. Before each of the first
    ``stage1_steps + 1`` network calls, at grid point ``t``, the pixels that have not reached their
    own level yet (``t_map <= t``) are redrawn from ``q(x_t | x_known)`` (a zero-step jump restores
    ``x_known`` exactly); in stage 1 (before call ``stage1_steps``) the whole image then takes
    ``resample_steps`` forward steps (one draw, folded into the next DDIM step: no extra call).
    Stage 2 is plain DDIM. Jump coefficients are not differentiated w.r.t. the levels.

    Args:
        x: (B, C, H, W) clean image, model space [-1, 1].
        t_map: (B, 1, H, W) per-pixel levels, points of ``grid[: stage1_steps + 1]``.
        grid: (K + 1, B) descending grid from ``t_l`` through ``grid[stage1_steps] = t_s`` to 0.
        randn: ``randn(like) -> noise``.
    Returns:
        (B, C, H, W) state at ``grid[-1]``; ``K`` calls of ``eps_fn``.
    """
    x_known = schedule.q_sample(x, t_map, randn(x))
    known_level = t_map.detach()

    def prepare(i: int, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if i > stage1_steps:
            return x_t, t
        t_now = t.detach()
        redraw = schedule.q_jump(x_known, known_level, t_now, randn(x_t))
        x_t = torch.where(known_level <= t_now.view(-1, 1, 1, 1), redraw, x_t)
        if i < stage1_steps and resample_steps > 0:
            t_up = (t + resample_steps).clamp(max=schedule.num_steps)
            x_t, t = schedule.q_jump(x_t, t_now, t_up.detach(), randn(x_t)), t_up
        return x_t, t

    return ddim_sample(schedule, eps_fn, x_known, grid, prepare=prepare)


class SaliencyDiffPurify(DiffusionPurifier):
    """Strong noise (``t_l``) on the pixels ``classifier`` attends to, weak noise (``t_s``) elsewhere.

    Saliency (:mod:`purifytf.saliency`): the classifier's stage activations ``sum_c |a|^2``,
    upsampled, min-max normalised per image and max-fused, computed on the input in [0, 1] (wrap a
    classifier that expects normalised inputs as ``nn.Sequential(v2.Normalize(...), net)``). Mask
    ``M``: ``saliency >= threshold`` (``"threshold"``, CIFAR), the top ``fraction`` of pixels
    (``"topk"``, ImageNet), or ``"continuous"`` (not in the paper): each pixel's level interpolates
    between ``t_s`` and ``t_l`` by its saliency, snapped to the stage-1 grid.

    Sampling (:func:`heterogeneous_ddim`), DDIM on a grid of spacing about ``spacing`` steps: stage 1
    from ``t_l`` to ``t_s`` re-noises the non-salient pixels and adds ``resample_steps`` forward
    steps ("single-step resampling") before every call; stage 2 from ``t_s`` to 0 is plain DDIM.
    NFE per image: ``ceil((t_l - t_s) / spacing) + ceil(t_s / spacing)`` (10 by default; the reference
    spacing 2 gives 100), the same for every sample of a batch: a sample whose levels SSNI scales down so far
    that ``t_l - t_s`` is under the stage-1 calls repeats grid points (calls spent without moving its level).
    The classifier pass is not an NFE. One purified image per input: the
    reference's 20-run majority vote is left to the caller.

    Deviation from the reference: there the non-salient pixels are redrawn from the input at the
    current level ``t`` at every stage-1 step and the last such state is DDIM-processed into stage 2.
    Here each pixel gets one fixed draw ``q_sample(x, t_map, z_0)`` at its own level and, until the
    chain reaches that level, is redrawn from ``q(x_t | x_known)`` (same marginal); at ``t_s`` the
    non-salient pixels are restored to exactly ``q_sample(x, t_s, z_0)``. So they never carry more
    noise than ``t_s``, an all-zeros mask is DiffPurify's DDIM at ``t_s`` and an all-ones mask
    (with ``resample_steps = 0``) DiffPurify's DDIM at ``t_l``, draw for draw.

    Hub: the classifier is a submodule, so its weights are saved with the purifier, and
    ``from_pretrained(path, classifier=net)`` (or ``purifytf.load_purifier``, also when nested in
    SSNI) needs a ``net`` of the same architecture (its weights are replaced by the saved ones). A
    callable ``stages`` is not saved either: pass it again.

    Args:
        backbone: eps-prediction network.
        classifier: the defended classifier, taking images in [0, 1]; kept in eval mode.
        t_l, t_s: strong and weak noise levels as fractions of T, ``0 < t_s < t_l <= 1`` (paper:
            0.2 / 0.1 on CIFAR-10, 0.4 / 0.2 on ImageNet). ``t_l`` is the :attr:`reference_level`; ``t_l * T``
            plus ``resample_steps`` must lie within the backbone's ``max_t``.
        mask: ``"threshold"``, ``"topk"`` or ``"continuous"``.
        threshold: saliency threshold of ``"threshold"`` (paper: 0.9).
        fraction: salient pixel fraction of ``"topk"`` (paper: 0.15 on ImageNet).
        resample_steps: forward steps U added before each stage-1 call (paper: 3).
        spacing: DDIM grid spacing in steps (paper: 2).
        stages: classifier stages, see :class:`~purifytf.saliency.StageFeatures` (``None``: automatic).
        mask_grad: let gradients flow through the saliency, straight-through in every mode (binary masks, and
            the continuous mode's levels snapped to the stage-1 grid: :func:`level_map`). Default: no gradient
            through the mask, as in the paper.
        checkpoint, seed: see :class:`DiffusionPurifier`.
    """

    def __init__(
        self,
        backbone: Backbone,
        classifier: nn.Module,
        t_l: float = 0.2,
        t_s: float = 0.1,
        mask: str = "threshold",
        threshold: float = 0.9,
        fraction: float = 0.15,
        resample_steps: int = 3,
        spacing: int = 20,
        stages: list[str] | Callable[[Tensor], Sequence[Tensor]] | None = None,
        mask_grad: bool = False,
        checkpoint: bool = False,
        seed: int | None = None,
    ):
        super().__init__(backbone, checkpoint=checkpoint, seed=seed)
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        if not 0 < t_s < t_l <= 1:
            raise ValueError(f"need 0 < t_s < t_l <= 1, got t_s={t_s}, t_l={t_l}")
        check_choice("mask", mask, _MASKS)
        if not 0 <= threshold <= 1 or not 0 <= fraction <= 1:
            raise ValueError(f"threshold and fraction must lie in [0, 1], got {threshold}, {fraction}")
        if resample_steps < 0 or spacing < 1:
            raise ValueError(f"need resample_steps >= 0 and spacing >= 1, got {resample_steps}, {spacing}")
        if input_channels(classifier) not in (None, self.in_channels):
            raise ValueError(f"the classifier takes {input_channels(classifier)}-channel images but the backbone "
                             f"purifies {self.in_channels}-channel ones: the saliency reads the purifier's input")
        self.classifier = classifier
        self.t_l, self.t_s = t_l, t_s
        self.mask = mask
        self.threshold, self.fraction = threshold, fraction
        self.resample_steps, self.spacing = resample_steps, spacing
        self.stages = stages
        self.mask_grad = mask_grad
        self._features = StageFeatures(classifier, stages)
        if self.small_level >= self.reference_level:
            raise ValueError(f"t_s={t_s} and t_l={t_l} round to {self.small_level} and {self.reference_level} "
                             f"steps of T = {self.schedule.num_steps}: t_l must be at least one step above t_s")
        self.check_level(self.reference_level, self.reference_setting)

    @property
    def reference_level(self) -> int:
        return max(1, round(self.t_l * self.schedule.num_steps))

    @property
    def reference_setting(self) -> str:
        return f"t_l={self.t_l}"

    @property
    def level_overshoot(self) -> int:
        return self.resample_steps

    @property
    def small_level(self) -> int:
        """``t_s`` in steps."""
        return max(1, round(self.t_s * self.schedule.num_steps))

    @property
    def stage_steps(self) -> tuple[int, int]:
        """Network calls of stage 1 (``t_l -> t_s``) and stage 2 (``t_s -> 0``)."""
        stage1 = math.ceil((self.reference_level - self.small_level) / self.spacing)
        return max(1, stage1), max(1, math.ceil(self.small_level / self.spacing))

    @property
    def num_steps(self) -> int:
        """Network calls per purification."""
        return sum(self.stage_steps)

    def compute_mask(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 1, H, W): the binary mask (1: salient) or, if continuous, the saliency."""
        if self._features.model is not self.classifier:
            self._features = StageFeatures(self.classifier, self.stages)
        with torch.set_grad_enabled(self.mask_grad and torch.is_grad_enabled()):
            saliency = activation_saliency(self._features(x), x.shape[-2:])
        if self.mask == "threshold":
            return threshold_mask(saliency, self.threshold)
        if self.mask == "topk":
            return topk_mask(saliency, self.fraction)
        return saliency

    def condition(self, x: Tensor) -> dict[str, Tensor]:
        """The mask of ``x`` in [0, 1], computed once per call (:meth:`compute_mask`)."""
        return {"mask": self.compute_mask(x)}

    def denoise(
        self,
        x: Tensor,
        generator: torch.Generator | None,
        level_scale: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """See :meth:`DiffusionPurifier.denoise`; ``mask`` (B, 1, H, W): :meth:`condition`'s (default: computed)."""
        batch, _, height, width = x.shape
        if mask is None:
            mask = self.compute_mask(to_image_space(x))
        elif mask.shape != (batch, 1, height, width):
            raise ValueError(f"mask must have shape {(batch, 1, height, width)}, got {tuple(mask.shape)}")
        t_l = self.reference_levels(batch, level_scale, x.device)
        t_s = self.levels(self.small_level, batch, level_scale, x.device)
        stage1, stage2 = self.stage_steps
        grid = torch.cat([timestep_grid(t_l, stage1, t_s), timestep_grid(t_s, stage2)[1:]])
        t_map = level_map(mask.to(x.dtype), grid[: stage1 + 1])
        randn = functools.partial(randn_like, generator=generator)
        return heterogeneous_ddim(self.schedule, self.eps, x, t_map, grid, stage1, self.resample_steps, randn)

    def _settings_repr(self) -> str:
        return (f"t_l={self.t_l}, t_s={self.t_s}, mask={self.mask!r}, threshold={self.threshold}, "
                f"fraction={self.fraction}, resample_steps={self.resample_steps}, steps={self.num_steps}")
