"""IMPurify: one-pass purification by information masking (IMPure, Liu et al., arXiv 2311.15339)."""

# No `from __future__ import annotations`: the Hub mixin reads the constructor's annotations.
import torch
from torch import Tensor

from ..base import Purifier
from ..config import legacy_steps_to_fractions
from ..models.mae import build_reconstructor

__all__ = ["IMPurify"]


class IMPurify(Purifier):
    """Reconstruct every patch from the others, with its own information masked by noise.

    The network (:class:`purifytf.models.MaskedReconstructor`) hides each of four interleaved
    patch groups in turn, fills its slots with latents of the noised image (``q_sample`` at
    ``image_t * T``) noised again in feature space (``feature_t * T``), and predicts the group from the
    other three; all four reconstructions are one batched pass (NFE = 1). No diffusion steps.

    Any image size works (padded to a multiple of twice the patch size, cropped back); the
    network is randomly initialised: train it with :mod:`purifytf.train` or load trained weights
    with :meth:`from_pretrained`.

    Args:
        preset: network size, a key of :data:`purifytf.models.MAE_PRESETS` (``"tiny"``: 28/32 px
            data on CPU; ``"base"``: the reference ViT-B/16 for 224 px ImageNet).
        in_channels: image channels (1 grey, 3 RGB).
        overrides: :class:`purifytf.models.MAEConfig` fields replacing the preset's.
        image_t: image noise level as a fraction of the network's T = 1000 steps, in [0, 1] (reference 0.4).
        feature_t: feature-space noise level on the hidden group's latents, fraction of T (reference 0.6).
        seed: see :class:`purifytf.Purifier`.
    """

    def __init__(
        self,
        preset: str = "tiny",
        in_channels: int = 3,
        overrides: dict | None = None,
        image_t: float = 0.4,
        feature_t: float = 0.6,
        seed: int | None = None,
    ):
        super().__init__(seed=seed)
        self.network = build_reconstructor(preset, in_channels, **(overrides or {}))
        for name, t in (("image_t", image_t), ("feature_t", feature_t)):
            if not 0 <= t <= 1:
                raise ValueError(f"{name} must be in [0, 1] (a fraction of T), got {t}")
        self.image_t = image_t
        self.feature_t = feature_t

    @property
    def in_channels(self) -> int:
        return self.network.in_channels

    @classmethod
    def _upgrade_legacy(cls, config: dict) -> dict:
        """Configs saved before class names were recorded gave ``image_t``/``feature_t`` in steps of T = 1000."""
        return legacy_steps_to_fractions(config, ("image_t", "feature_t"))

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        steps = self.network.schedule.num_steps
        return self.network(x, generator, image_t=round(self.image_t * steps), feature_t=round(self.feature_t * steps))

    def _settings_repr(self) -> str:
        return f"image_t={self.image_t}, feature_t={self.feature_t}"
