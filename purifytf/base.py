"""The purifier contract every purifier implements.

A purifier is an ``nn.Module``, a torchvision ``transforms.v2.Transform`` and a
:class:`~purifytf.config.Configurable` (a Hugging Face Hub mixin): it drops into ``v2.Compose``,
saves its settings to ``config.json`` (naming its class; nested parts included) and its weights
to ``model.safetensors``, loads back with ``Purifier.from_pretrained`` / ``purifytf.load_purifier``
whatever its class, and is differentiable end to end.

Subclasses implement :meth:`Purifier._purify` on a validated ``(B, C, H, W)`` float batch in
[0, 1] at the purifier's working resolution; this class does the rest (checks, shapes, dtype,
device, resizing, tv_tensor types, seeding, NFE bookkeeping).
"""

# No `from __future__ import annotations` here or in subclasses: the Hub mixin reads the
# constructor's annotations at run time.
import contextlib
from collections.abc import Iterator

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from .config import Configurable
from .diffusion.schedule import NoiseSchedule
from .inputs import check_images
from .nfe import total_nfe
from .random import SampleStreams, Source

__all__ = ["Purifier", "clamp01", "freeze", "input_channels", "trainable"]


def clamp01(x: Tensor) -> Tensor:
    """Clamp to [0, 1], keeping gradient 1 on values at the bounds (``Tensor.clamp`` gives 0 there)."""
    return torch.where((x < 0) | (x > 1), x.clamp(0, 1), x)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _is_image_like(inpt) -> bool:
    """Samples a purifier transforms: tensors, images, videos, and PIL images and NumPy arrays of 2+ dimensions
    (which it refuses with a clear error rather than pass them through unpurified); labels pass through."""
    return (type(inpt) is Tensor or isinstance(inpt, (tv_tensors.Image, tv_tensors.Video, PIL.Image.Image))
            or (isinstance(inpt, np.ndarray) and inpt.ndim >= 2))


class Purifier(
    Configurable,
    v2.Transform,
    library_name="purifytf",
    license="apache-2.0",
    tags=["adversarial-purification", "adversarial-robustness", "image-classification"],
    repo_url="https://github.com/purifytf/purifytf",
):
    """Base class of all purifiers.

    Call it like any v2 transform: ``purifier(x)`` with ``x`` a float tensor in [0, 1] of shape
    ``(C, H, W)`` or ``(..., C, H, W)`` (plain or ``tv_tensors.Image``/``Video``); inside
    ``v2.Compose`` on ``(image, label)`` samples the label is passed through. Output: same shape,
    dtype, device and type, values in [0, 1]. Inputs whose size differs from the model's
    ``sample_size`` are resized to it (bilinear, antialiased) and the result is resized back.

    Randomness (:mod:`purifytf.random`): :meth:`purify` takes a ``torch.Generator`` (one draw per
    batch); with ``seed`` set, every call draws from fresh per-sample streams of that seed (a
    deterministic defence: an image's output depends on the image and the seed only, not on its
    batch-mates or its position, on CPU and CUDA alike); otherwise the global RNG is used.

    Frozen networks: every network assigned to a purifier (backbone, classifier, reconstruction
    network, nested purifier) is frozen on assignment, ``requires_grad_(False)`` and eval mode, in
    place. So an output carries autograd history only when the input requires grad, and gradients
    reach the input only. To train a network or take gradients w.r.t. its parameters, ask for it:
    ``purifier.network.requires_grad_(True)``, or for a block ``with trainable(network):`` (the
    training recipes' steps run so, see :class:`purifytf.train.loop.Trainer`). ``train()`` and
    ``eval()`` set the ``training`` flag only and change no output; a network put in train mode by
    hand stays so until put back (nothing is re-checked per call).

    Attributes:
        last_nfe: network evaluations per image of the last call (counted in a tensor, see
            :mod:`purifytf.nfe`: exact under ``torch.compile`` too).
        card_data: Hub card metadata beyond the mixin's (``datasets``, ``base_model``, ``metrics``, ...),
            written into the ``README.md`` of ``save_pretrained``/``push_to_hub``; the pretrained entry
            points fill it from their weights (see :func:`purifytf.hub.model_card`).
    """

    CARD_KEYS = ("datasets", "license", "base_model", "metrics", "pipeline_tag", "model_name", "eval_results")

    _transformed_types = (_is_image_like,)

    _abstract_config = True

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed
        self._nfe = torch.zeros((), dtype=torch.int64)
        self.card_data: dict = {}

    def generate_model_card(self, *args, **kwargs):
        """The mixin's card (``library_name``, ``tags``, ``license``) plus :attr:`card_data`."""
        card = super().generate_model_card(*args, **kwargs)
        for key in self.CARD_KEYS:
            if key in self.card_data:
                setattr(card.data, key, self.card_data[key])
        return card

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def in_channels(self) -> int | None:
        """Channels the model takes (``None``: any)."""
        return None

    @property
    def sample_size(self) -> tuple[int, int] | None:
        """Working resolution (H, W); inputs of another size are resized (``None``: any size)."""
        return None

    @property
    def min_size(self) -> int:
        """Smallest image side the purifier can handle."""
        return 1

    def _purify(self, x: Tensor, generator: Source) -> Tensor:
        """(B, C, H, W) float in [0, 1] at ``sample_size`` -> purified (B, C, H, W)."""
        raise NotImplementedError

    # --- the public API ----------------------------------------------------------------------
    @property
    def last_nfe(self) -> int:
        return int(self._nfe)

    def purify(self, x: Tensor, generator: Source = None) -> Tensor:
        """Purify a plain tensor ``(C, H, W)`` or ``(..., C, H, W)`` in [0, 1]; see the class doc."""
        work, generator = self.prepare(x, generator)
        start = total_nfe().clone()
        out = self._purify(work, generator)
        self._nfe = total_nfe() - start
        if out.shape[-2:] != x.shape[-2:]:
            out = _resize(out, tuple(x.shape[-2:]))
        return clamp01(out).to(device=x.device, dtype=x.dtype).reshape(x.shape)

    def prepare(self, x: Tensor, generator: Source = None) -> tuple[Tensor, Source]:
        """Checked ``(B, C, H, W)`` batch on the model's device and float dtype at ``sample_size``,
        and the source of noise (fresh :class:`~purifytf.random.SampleStreams` when ``seed`` is set)."""
        batch = check_images(x, self.in_channels, self.min_size)
        device, dtype = self._device_dtype(batch)
        if generator is None and self.seed is not None:
            generator = SampleStreams(self.seed)
        work = clamp01(batch.to(device=device, dtype=dtype))
        if self.sample_size is not None and tuple(work.shape[-2:]) != self.sample_size:
            work = _resize(work, self.sample_size)
        return work, generator

    def extra_repr(self) -> str:
        """The purifier's settings (:meth:`_settings_repr`), then ``seed`` and ``checkpoint`` where set."""
        extras = [f"seed={self.seed}"] if self.seed is not None else []
        extras += ["checkpoint=True"] if getattr(self, "checkpoint", False) else []
        return ", ".join(filter(None, [self._settings_repr(), *extras]))

    def _settings_repr(self) -> str:
        return ""

    def _device_dtype(self, batch: Tensor) -> tuple[torch.device, torch.dtype]:
        """Device of the model's tensors, and float64 if the model was made double, else float32; a model
        without tensors works on the batch's device, in float64 for float64 input (exact gradients).

        Low-precision weights (``.half()``, ``.bfloat16()``) run only under ``torch.autocast`` (bf16/fp16 network
        calls; the purification maths stay float32); without it they are refused.
        """
        schedules = {id(b) for m in self.modules() if isinstance(m, NoiseSchedule) for b in m.buffers()}
        tensors = [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        if not tensors:
            return batch.device, torch.float64 if batch.dtype == torch.float64 else torch.float32
        weights = [t for t in tensors if id(t) not in schedules] or tensors
        low = weights[0].dtype if weights[0].dtype in (torch.float16, torch.bfloat16) else None
        if low and not torch.is_autocast_enabled(tensors[0].device.type):
            raise TypeError(f"{type(self).__name__} holds {low} weights: purification runs float32 maths (float64 "
                            f"after .double()); call it under torch.autocast(device_type, dtype={low}) for "
                            f"low-precision network calls, or keep float32 weights")
        return tensors[0].device, torch.float64 if weights[0].dtype == torch.float64 else torch.float32

    def _needs_transform_list(self, flat_inputs: list) -> list[bool]:
        """torchvision's rule (without an explicit image, only the first plain tensor is one), refusing a sample
        whose second image-like plain tensor would pass through unpurified."""
        needs = super()._needs_transform_list(flat_inputs)
        plain = [inpt for inpt in flat_inputs if type(inpt) is Tensor and inpt.ndim >= 3]
        if len(plain) > 1 and not any(isinstance(inpt, (tv_tensors.Image, tv_tensors.Video, PIL.Image.Image))
                                      for inpt in flat_inputs):
            shapes = ", ".join(str(tuple(inpt.shape)) for inpt in plain)
            raise ValueError(f"the sample holds {len(plain)} plain tensors of 3+ dimensions ({shapes}); a transform "
                             "treats only the first as the image and would pass the others through unpurified: "
                             "purify each image on its own, or wrap the images in tv_tensors.Image (and masks in "
                             "tv_tensors.Mask)")
        return needs

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(self.purify(inpt.as_subclass(Tensor)), like=inpt)
        return self.purify(inpt)

    def train(self, mode: bool = True):
        """Sets the ``training`` flag only: the networks stay in eval mode (same output either way)."""
        self.training = mode
        return self

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module):
            freeze(value)
        super().__setattr__(name, value)


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with ``requires_grad`` off on every parameter, in place: what purifiers
    do to the networks assigned to them (undone for a block by :func:`trainable`)."""
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def trainable(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``module`` is in train mode with gradients on every parameter (e.g. a purifier's
    frozen network during a training step); its modes and ``requires_grad`` flags are restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    modes = [m.training for m in module.modules()]
    module.train().requires_grad_(True)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
        for submodule, mode in zip(module.modules(), modes, strict=True):
            submodule.training = mode


_KEEP_CHANNELS = (v2.Normalize, v2.Resize, v2.CenterCrop, v2.ToDtype, nn.Identity)


def input_channels(module: nn.Module | None) -> int | None:
    """Image channels ``module`` takes: a purifier's ``in_channels``, else the ``in_channels`` of its first
    2-D convolution (timm, torchvision and most CNNs); ``None`` when unknown (any channel count), as for an
    ``nn.Sequential`` with a step before its first convolution that may change them (``v2.RGB()``, a custom
    module; ``v2.Normalize``, ``v2.Resize``, ``v2.CenterCrop``, ``v2.ToDtype`` and ``nn.Identity`` keep them)."""
    if module is None:
        return None
    if isinstance(module, Purifier):
        return module.in_channels
    if isinstance(module, nn.Sequential):  # through the steps known to keep the channels, to the first network
        for step in module:
            if isinstance(step, Purifier) or any(isinstance(m, nn.Conv2d) for m in step.modules()):
                return input_channels(step)
            if not isinstance(step, _KEEP_CHANNELS):
                return None
        return None
    return next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)
