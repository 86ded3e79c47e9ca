"""Noise-prediction networks behind one protocol, kept apart from schedules and samplers.

Protocol: ``backbone(x_t, t) -> eps`` with ``x_t`` (B,C,H,W) in model space [-1, 1] and ``t``
(B,) schedule steps in ``[1, T]`` (integer, or float for straight-through levels), the library's one
timestep convention; only the adapters of third-party networks trained on the 0-based DDPM index
shift it (:func:`~purifytf.diffusion.schedule.network_timestep`). Every backbone knows the schedule
it was trained with, the largest step it was trained on (``max_t``), its channel count and its
native resolution, and describes itself by a JSON ``config`` naming its class (the one
configuration system of :mod:`purifytf.config`); weights travel in the state_dict.
"""

# No `from __future__ import annotations`: the Hub mixin reads constructor annotations at run time.
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import Configurable
from ..functional import to_model_space
from .schedule import NoiseSchedule, network_timestep

__all__ = [
    "Backbone",
    "OracleBackbone",
    "DiffusersUNet",
    "build_backbone",
    "schedule_config",
    "schedule_from_config",
]


def build_backbone(config: dict[str, Any]) -> "Backbone":
    """Rebuild a backbone (random weights) from its :attr:`Backbone.config`: ``Backbone.from_config``."""
    return Backbone.from_config(config)


def schedule_config(schedule: NoiseSchedule) -> dict[str, Any]:
    """JSON description of a schedule: the linear DDPM one by name, any other by its table."""
    linear = NoiseSchedule.linear(schedule.num_steps)
    if torch.allclose(schedule.alphas_cumprod.cpu(), linear.alphas_cumprod, rtol=1e-9, atol=0):  # any device
        return {"kind": "linear", "num_steps": schedule.num_steps}
    return {"kind": "table", "alphas_cumprod": schedule.alphas_cumprod.tolist()}


def schedule_from_config(config: dict[str, Any] | None) -> NoiseSchedule:
    if config is None or config.get("kind") == "linear":
        return NoiseSchedule.linear(**{k: v for k, v in (config or {}).items() if k != "kind"})
    return NoiseSchedule(config["alphas_cumprod"])


class Backbone(Configurable, nn.Module):
    """Base class: subclasses implement ``_predict``, ``_config`` and ``_from_config``.

    Config: ``{"_class_name", "schedule", "max_t", **_config()}``; ``_from_config`` rebuilds the
    network from it (``schedule`` and ``max_t`` are restored by this class).

    Attributes:
        in_channels: image channels the network takes.
        sample_size: native (H, W), or ``None`` for fully convolutional use at any size.
        min_size: smallest side the network can process.
        max_t: largest schedule step the network was trained on (default: all ``T``); diffusion
            purifiers refuse noise levels beyond it.
        kind: name in configs saved before class names were recorded (read only to load those).
    """

    kind: ClassVar[str]
    _abstract_config = True

    def __init__(self, in_channels: int, sample_size: tuple[int, int] | None, schedule: NoiseSchedule | None):
        super().__init__()
        self.in_channels = in_channels
        self.sample_size = tuple(sample_size) if sample_size is not None else None
        self.schedule = schedule if schedule is not None else NoiseSchedule.linear()
        self._max_t: int | None = None

    min_size: int = 8

    @property
    def max_t(self) -> int:
        return self.schedule.num_steps if self._max_t is None else min(self._max_t, self.schedule.num_steps)

    @max_t.setter
    def max_t(self, value: int | None) -> None:
        if value is not None and not 1 <= value <= self.schedule.num_steps:
            raise ValueError(f"max_t must be in [1, {self.schedule.num_steps}] (the schedule's T), got {value}")
        self._max_t = value

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """(B,C,H,W), (B,) steps in [1, T] -> eps (B,C,H,W); extra output channels (learned sigma) are dropped."""
        return self._predict(x_t, t)[:, : self.in_channels]

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        return {"_class_name": type(self).__name__, "schedule": schedule_config(self.schedule), "max_t": self.max_t,
                **self._config()}

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> "Backbone":
        raise NotImplementedError

    @classmethod
    def _build(cls, config: dict[str, Any], kwargs: dict[str, Any], used: set[str]) -> "Backbone":
        backbone = cls._from_config(config)
        backbone.max_t = config.get("max_t")
        return backbone

    @classmethod
    def _legacy_class(cls, config: dict[str, Any]) -> type:
        if "kind" not in config:
            return super()._legacy_class(config)
        kinds = {getattr(c, "kind", None): c for c in _subclasses(Backbone)}
        if config["kind"] not in kinds:
            raise ValueError(f"unknown backbone kind {config.get('kind')!r}; known: {sorted(filter(None, kinds))}")
        return kinds[config["kind"]]

    @classmethod
    def _upgrade_legacy(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k != "kind"}


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


class OracleBackbone(Backbone):
    """Exact optimal denoiser of the empirical distribution of a reference set.

    For ``p_0 = (1/N) sum_i delta(r_i)``, ``E[x_0 | x_t] = sum_i w_i r_i`` with
    ``w = softmax(-||x_t - sqrt(abar) r_i||^2 / (2 (1 - abar)))``; the returned ``eps`` is the one
    whose Tweedie estimate is that posterior mean. Used to test samplers exactly.

    Args:
        references: (N, C, H, W) images in [0, 1].
    """

    kind = "oracle"
    min_size = 1

    def __init__(self, references: Tensor, schedule: NoiseSchedule | None = None):
        if references.dim() != 4 or references.shape[0] < 1:
            raise ValueError(f"references must be (N, C, H, W) with N >= 1, got {tuple(references.shape)}")
        super().__init__(references.shape[1], references.shape[-2:], schedule)
        self.register_buffer("references", to_model_space(references.float()))

    def posterior_mean(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``E[x_0 | x_t]`` (B,C,H,W) in [-1, 1] at step ``t`` (B,)."""
        abar = self.schedule.alpha_bar(t, like=x_t).flatten()[:, None]  # (B, 1)
        refs = self.references.flatten(1).to(x_t.dtype)  # (N, D)
        x = x_t.flatten(1)
        sq_dist = (x.square().sum(1, keepdim=True) - 2 * abar.sqrt() * x @ refs.T
                   + abar * refs.square().sum(1)[None])
        logits = -sq_dist / (2 * (1 - abar).clamp_min(1e-12))
        return (logits.softmax(dim=1) @ refs).view_as(x_t)

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        abar = self.schedule.alpha_bar(t, like=x_t)
        return (x_t - abar.sqrt() * self.posterior_mean(x_t, t)) / (1 - abar).clamp_min(1e-12).sqrt()

    def _config(self) -> dict[str, Any]:
        return {"num_references": self.references.shape[0], "channels": self.in_channels,
                "size": list(self.sample_size)}

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> "OracleBackbone":
        refs = torch.zeros(config["num_references"], config["channels"], *config["size"])
        return cls(refs, schedule_from_config(config.get("schedule")))


class DiffusersUNet(Backbone):
    """Adapter for a diffusers ``UNet2DModel`` (e.g. the Hub's ``google/ddpm-cifar10-32``).

    Output channels beyond ``in_channels`` (learned variance) are dropped by :meth:`forward`.
    """

    kind = "diffusers_unet2d"

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule | None = None):
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        super().__init__(unet.config.in_channels, size, schedule)
        self.unet = unet
        self.min_size = 2 ** (len(unet.config.block_out_channels) - 1)

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, network_timestep(t)).sample

    def _config(self) -> dict[str, Any]:
        return {"unet": {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}}

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> "DiffusersUNet":
        from diffusers import UNet2DModel

        return cls(UNet2DModel(**config["unet"]), schedule_from_config(config.get("schedule")))

