"""SSNIPurify: sample-specific score-aware noise injection (SSNI, tmlr-group/SSNI, arXiv 2506.06027)."""

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ..base import Purifier
from ..config import legacy_steps_to_fractions
from ..functional import to_model_space
from ..inputs import check_images
from .diffusion import DiffusionPurifier

__all__ = ["SSNIPurify", "sigmoid_reweight", "linear_reweight", "norm_statistics"]

_STAT_KEYS = ("mean", "std", "min", "max", "count", "eps_steps")


def sigmoid_reweight(norm: Tensor, mean: float, tau: float, t_star: float, bias: float) -> Tensor:
    """SSNI-N: ``sigmoid((norm - mean) / tau) * (t_star + bias)``; (B,) norms -> (B,) levels in the unit of
    ``t_star`` and ``bias`` (both fractions of T, or both steps)."""
    return torch.sigmoid((norm - mean) / tau) * (t_star + bias)


def linear_reweight(norm: Tensor, low: float, high: float, t_star: float, bias: float) -> Tensor:
    """SSNI-L: ``(norm - low) * t_star / (high - low) + bias``; (B,) norms -> (B,) levels in the unit of
    ``t_star`` and ``bias``.

    Clamped to ``[bias, t_star + bias]``: the range of the reference, whose min/max include the batch.
    """
    return ((norm - low) * (t_star / (high - low)) + bias).clamp(bias, t_star + bias)


def norm_statistics(norms: Tensor) -> dict:
    """Reference statistics of (N,) score norms, N >= 2: mean, std (unbiased), min, max, count."""
    norms = norms.detach().double().flatten()
    if norms.numel() < 2:
        raise ValueError(f"calibration needs at least 2 images, got {norms.numel()}")
    return {"mean": norms.mean().item(), "std": norms.std().item(), "min": norms.min().item(),
            "max": norms.max().item(), "count": norms.numel()}


def _check_stats(stats: dict) -> dict:
    missing = [k for k in _STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"stats lacks {missing}; expected keys {list(_STAT_KEYS)} (see SSNIPurify.calibrate)")
    stats = {k: float(stats[k]) for k in _STAT_KEYS} | {k: int(stats[k]) for k in ("count", "eps_steps")}
    if not all(math.isfinite(v) for v in stats.values()):
        raise ValueError(f"stats must be finite, got {stats}")
    if stats["count"] < 2 or stats["std"] <= 0 or stats["max"] <= stats["min"]:
        raise ValueError(f"degenerate calibration (all reference norms equal?): {stats}; "
                         "calibrate on at least 2 distinct clean images")
    return stats


def _batches(data: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    """Image batches of a tensor (split in ``batch_size`` chunks) or of a loader (first item of tuples)."""
    if isinstance(data, Tensor):
        return check_images(data, None, 0).split(batch_size)
    return (item[0] if isinstance(item, (tuple, list)) else item for item in data)


class SSNIPurify(Purifier):
    """Diffuse each sample to its own level ``t(x)``, picked from its score norm, then purify with ``base``.

    SSNI is a noise-level *rule* that any diffusion purifier runs with: ``base``'s own pipeline
    (:meth:`~purifytf.purifiers.diffusion.DiffusionPurifier.run`: model space once, a saliency mask once
    in [0, 1]) takes its levels from :meth:`level_scale` instead of its constant setting, so uniform
    (``DiffPurify``) and heterogeneous (``SaliencyDiffPurify``) noise work alike.

    ``n(x) = ||EPS(2x - 1)||_2`` (:func:`~purifytf.score.expected_perturbation_score` over ``eps_steps``
    levels with ``base``'s network) is compared with reference statistics of clean images
    (:meth:`calibrate`) and mapped to a level around ``t* = base.reference_level``:

    - ``"sigmoid"`` (SSNI-N): ``t = sigmoid((n - mean) / tau) * (t* + bias)``;
    - ``"linear"`` (SSNI-L): ``t = (n - min) * t* / (max - min) + bias``, within ``[bias, t* + bias]``;

    rounded and clamped to ``[1, T]``. ``base`` then runs with ``level_scale = t / t*`` (every level of
    the method rescaled per sample, same number of network calls for every sample). A sample's
    ``t`` depends on the sample and the generator only, never on its batch-mates.
    NFE per image: ``eps_steps`` + the base purifier's calls.

    Args:
        base: the diffusion purifier to drive (e.g. ``DiffPurify``, ``SaliencyDiffPurify``).
        reweight: ``"sigmoid"`` (SSNI-N) or ``"linear"`` (SSNI-L).
        tau: temperature of SSNI-N, in norm units (``None``: the calibrated std).
        bias: ``b``, a fraction of T like every noise level (reference: 5 steps of 1000, 0.005); the
            largest level SSNI can pick, ``t* + bias``, must lie within the backbone's ``max_t``.
        eps_steps: ``T'``, levels averaged in the EPS (reference: 20 CIFAR-10, 50 ImageNet).
        score_grad: let gradients flow through the score norm into ``t`` (straight-through rounding),
            for adaptive attacks; by default ``t`` is picked without gradient, as in the reference.
        stats: reference statistics (``mean``, ``std``, ``min``, ``max``, ``count`` and the ``eps_steps`` they
            were measured with, which must be this purifier's), normally set by :meth:`calibrate` and restored by
            ``from_pretrained``.
        seed: see :class:`~purifytf.Purifier`; ``None``: ``base``'s seed. One generator (this purifier's)
            drives the score and ``base``'s chain.

    Attributes:
        stats: the reference statistics, or ``None`` before calibration.
        last_t: (B,) long, noise level (steps) of each sample in the last call: the one ``base`` used.
    """

    def __init__(
        self,
        base: DiffusionPurifier,
        reweight: str = "sigmoid",
        tau: float | None = None,
        bias: float = 0.005,
        eps_steps: int = 20,
        score_grad: bool = False,
        stats: dict[str, float] | None = None,
        seed: int | None = None,
    ):
        if not isinstance(base, DiffusionPurifier):
            raise TypeError(f"base must be a DiffusionPurifier (e.g. DiffPurify), got {type(base).__name__}")
        super().__init__(seed=base.seed if seed is None else seed)
        if reweight not in ("sigmoid", "linear"):
            raise ValueError(f"reweight must be 'sigmoid' (SSNI-N) or 'linear' (SSNI-L), got {reweight!r}")
        if tau is not None and not tau > 0:
            raise ValueError(f"tau must be > 0 (or None for the calibrated std), got {tau}")
        if not 1 <= eps_steps <= base.backbone.max_t:
            raise ValueError(f"eps_steps must be in [1, {base.backbone.max_t}] (the EPS calls the network at levels "
                             f"1..eps_steps; the backbone's trained range max_t = {base.backbone.max_t}), "
                             f"got {eps_steps}")
        self.base = base
        self.reweight = reweight
        self.tau = tau
        self.bias = bias
        self.eps_steps = eps_steps
        self.score_grad = score_grad
        self.stats = None if stats is None else _check_stats(stats)
        self._check_range()
        if self.stats is not None:
            self._calibration()

    def _check_range(self) -> None:
        """The largest level SSNI can pick, ``t* + bias``, must be at least one step and lie within the
        backbone's ``max_t``."""
        top = self.largest_level
        setting = f"SSNI's t* + bias (bias={self.bias})"
        if top < 1:
            raise ValueError(f"{setting} is {top:g} steps: every sample would get the lowest level, 1 step")
        self.base.check_level(top, setting)

    @property
    def largest_level(self) -> float:
        """``t* + bias`` in steps of ``base``'s schedule (unrounded): the largest noise level SSNI can pick."""
        return self.base.reference_level + self.bias * self.base.schedule.num_steps

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def sample_size(self) -> tuple[int, int] | None:
        return self.base.sample_size

    @property
    def min_size(self) -> int:
        return self.base.min_size

    # --- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, data: Tensor | Iterable, batch_size: int = 64, generator: torch.Generator | None = None
                  ) -> dict:
        """Compute and store the reference statistics of the score norm over clean images.

        Args:
            data: clean images in [0, 1]: a tensor ``(N, C, H, W)``, or an iterable of batches
                (e.g. a ``DataLoader`` yielding tensors or ``(images, labels)``).
            batch_size: images per network call when ``data`` is a tensor.
            generator: noise of the EPS (default: from ``seed`` if set, else the global RNG).
        Returns:
            the statistics (with this purifier's ``eps_steps``), also stored in :attr:`stats` and in the
            config saved by ``save_pretrained``.
        """
        norms = [self.score_norm(batch, generator) for batch in _batches(data, batch_size)]
        if not norms:
            raise ValueError("calibration data is empty: pass clean images (N, C, H, W) in [0, 1]")
        self.stats = _check_stats({**norm_statistics(torch.cat(norms)), "eps_steps": self.eps_steps})
        return dict(self.stats)

    # --- noise levels ----------------------------------------------------------------------------
    def score_norm(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``||EPS(2x - 1)||_2`` (B,) of images ``x`` (..., C, H, W) in [0, 1]; NFE ``eps_steps``."""
        work, generator = self.prepare(x, generator)
        return self._score_norm(to_model_space(work), generator)

    def noise_levels(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise level (B,) in steps each image of ``x`` (..., C, H, W) in [0, 1] would be diffused to.

        Long, or float with a straight-through gradient (integer values) when ``score_grad`` is set
        and gradients are enabled. Same generator use as a call: equals ``last_t`` under a seed.
        """
        work, generator = self.prepare(x, generator)
        scale = self.level_scale(to_model_space(work), generator)
        return self.base.levels(self.base.reference_level, len(scale), scale, scale.device)

    def _score_norm(self, x_d: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.base.expected_score(x_d, self.eps_steps, generator).flatten(1).norm(dim=1)

    def level_scale(self, x_d: Tensor, generator: torch.Generator | None) -> Tensor:
        """SSNI's level rule (a :data:`~purifytf.purifiers.diffusion.LevelRule`): images ``x_d`` (B,C,H,W) in
        model space -> (B,) factor on every noise level of ``base``, ``t(x) / t*`` (unrounded)."""
        stats = self._calibration()
        t_star, bias = self.base.reference_level, self.bias * self.base.schedule.num_steps  # in steps
        with torch.set_grad_enabled(self.score_grad and torch.is_grad_enabled()):
            norm = self._score_norm(x_d, generator)
            if self.reweight == "sigmoid":
                tau = self.tau if self.tau is not None else stats["std"]
                t = sigmoid_reweight(norm, stats["mean"], tau, t_star, bias)
            else:
                t = linear_reweight(norm, stats["min"], stats["max"], t_star, bias)
        return t / t_star

    def _calibration(self) -> dict:
        """The reference statistics, if they were measured with this purifier's ``eps_steps``."""
        if self.stats is None:
            raise RuntimeError("SSNIPurify is not calibrated: call purifier.calibrate(clean_images) first "
                               "(or load a calibrated purifier with from_pretrained)")
        if self.stats["eps_steps"] != self.eps_steps:
            raise ValueError(f"the statistics were calibrated with eps_steps={self.stats['eps_steps']}, this purifier "
                             f"averages eps_steps={self.eps_steps}: the score norms are not comparable; use "
                             f"eps_steps={self.stats['eps_steps']} or calibrate again")
        return self.stats

    @property
    def last_t(self) -> Tensor | None:
        """(B,) long, the noise level (steps) each sample of the last call was diffused to (``base``'s)."""
        return self.base.last_t

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        self._check_range()
        return self.base.run(x, generator, self.level_scale)

    @classmethod
    def _upgrade_legacy(cls, config: dict) -> dict:
        """Configs saved before class names were recorded gave ``bias`` in steps of T = 1000."""
        return legacy_steps_to_fractions(config, ("bias",))

    def _settings_repr(self) -> str:
        tau = f", tau={self.tau}" if self.reweight == "sigmoid" else ""
        return (f"reweight={self.reweight!r}{tau}, bias={self.bias}, eps_steps={self.eps_steps}, "
                f"score_grad={self.score_grad}, calibrated={self.stats is not None}")
