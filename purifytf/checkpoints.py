"""Reading public diffusion checkpoints: safe file loading, key layouts and training schedules.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)`` only, so a checkpoint can
never run code. Each *format* maps a file's state_dict onto the matching purifytf backbone
(:data:`FORMATS`); the schedule helpers turn the checkpoint's own schedule description into a
:class:`~purifytf.diffusion.NoiseSchedule`.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .diffusion.schedule import NoiseSchedule

__all__ = [
    "FORMATS",
    "convert_state_dict",
    "cosine_schedule",
    "diffusers_legacy_to_current",
    "guided_diffusion_schedule",
    "load_state_dict_file",
    "schedule_from_diffusers",
    "score_sde_ema_state",
]

StateDict = dict[str, Tensor]


def _is_score_sde_checkpoint(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("ema"), dict)
            and isinstance(obj["ema"].get("shadow_params"), list))


_WEIGHTS_ONLY_REFUSALS = ("unsupported global", "unsupported class", "trying to call reduce",
                          "can only create new object")
"""Phrases of torch's weights_only unpickler refusing to build or call something (as opposed to unreadable bytes)."""


def _has_safetensors_header(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: a little-endian u64 header length, then a JSON object."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> StateDict:
    """Read a flat ``{name: tensor}`` file: ``.safetensors``, else a ``weights_only`` torch pickle.

    A score_sde training checkpoint ``{'model', 'ema', 'optimizer', 'step'}`` comes back flattened to
    ``model.<key>`` and ``ema.shadow_params.<i>`` tensors (optimizer state and counters dropped), the input of
    the ``"score_sde"`` layout in :data:`FORMATS`.

    Raises ``ValueError`` naming the file when it is corrupt or truncated, holds anything but tensors,
    or is a pickle that would need to run code to load (refused, never executed).
    """
    path = Path(path)
    if path.suffix == ".safetensors" or _has_safetensors_header(path):
        try:
            state = load_file(path, device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a valid safetensors file (corrupt or truncated?): {err}") from err
    else:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if not any(refusal in str(err).lower() for refusal in _WEIGHTS_ONLY_REFUSALS):
                raise ValueError(f"{path}: not a torch checkpoint (corrupt, truncated, or another kind of file, "
                                 f"e.g. an error page saved by a download?): {err}") from err
            raise ValueError(f"{path}: refused to load: the pickle holds more than tensors and plain containers "
                             f"(only safetensors and torch.load(weights_only=True) files are read): {err}") from err
        except (RuntimeError, EOFError) as err:
            raise ValueError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {err}") from err
        if _is_score_sde_checkpoint(state):
            state = {**_under("model.", state["model"]),
                     **{f"ema.shadow_params.{i}": p for i, p in enumerate(state["ema"]["shadow_params"])}}
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state_dict of tensors, got {type(state).__name__}")
    return state


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_PATTERN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def diffusers_legacy_to_current(state_dict: StateDict) -> StateDict:
    """Rename early diffusers' attention weights (``query/key/value/proj_attn``) to today's ``to_q/.../to_out.0``."""
    return {_LEGACY_PATTERN.sub(lambda m: f"{m[1]}{_LEGACY_ATTENTION[m[2]]}.", k): v for k, v in state_dict.items()}


def _strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _under(prefix: str, state_dict: StateDict) -> StateDict:
    return {prefix + k: v for k, v in state_dict.items()}


_SCORE_SDE_BUFFERS = ("sigmas",)


def score_sde_ema_state(state_dict: StateDict) -> StateDict:
    """A score_sde training checkpoint, as :func:`load_state_dict_file` flattens it -> the ``NCSNpp`` state_dict
    with the EMA weights (those score_sde evaluates and DiffPure purifies with, ``ema.copy_to``).

    The unnamed ``ema.shadow_params`` list is matched by position to the network's parameters: the ``model`` keys
    (``module.`` prefix stripped) less the buffer ``sigmas``, which is taken from ``model``. Key order is ``model``'s.
    """
    model = _strip_prefix({k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")},
                          "module.")
    names = [k for k in model if k not in _SCORE_SDE_BUFFERS]
    num_shadow = sum(k.startswith("ema.shadow_params.") for k in state_dict)
    shadow = [state_dict[f"ema.shadow_params.{i}"] for i in range(num_shadow)]
    if not names or len(shadow) != len(names):
        raise ValueError(f"not a score_sde checkpoint: {len(shadow)} EMA tensors for {len(names)} model parameters "
                         "(expected 'model' and 'ema.shadow_params' of the same network)")
    for name, p in zip(names, shadow, strict=True):
        if p.shape != model[name].shape:
            raise ValueError(f"score_sde EMA tensor for {name!r} has shape {tuple(p.shape)}, "
                             f"the model's {tuple(model[name].shape)}")
    return {**model, **dict(zip(names, shadow, strict=True))}


FORMATS: dict[str, Callable[[StateDict], StateDict]] = {
    "purifytf": lambda sd: sd,
    "diffusers_unet": lambda sd: _under("unet.", diffusers_legacy_to_current(sd)),
    "guided_diffusion": lambda sd: _under("unet.", _strip_prefix(sd, "module.")),
    "score_sde": lambda sd: _under("model.", score_sde_ema_state(sd)),
}
"""Checkpoint layout -> function mapping its state_dict onto the backbone's (:class:`~purifytf.diffusion.
DiffusersUNet`, :class:`~purifytf.diffusion.guided_unet.GuidedDiffusionUNet`,
:class:`~purifytf.diffusion.score_sde.ScoreSDEBackbone`, or a purifytf file as is)."""


def convert_state_dict(fmt: str, state_dict: StateDict) -> StateDict:
    """Map a checkpoint's state_dict in layout ``fmt`` (a key of :data:`FORMATS`) onto its backbone."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt](state_dict)


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """Nichol & Dhariwal's cosine schedule (betas clipped at ``max_beta``, as upstream and diffusers do)."""
    def f(i: float) -> float:
        return math.cos((i / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)], dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1 - betas, 0))


def _betas_schedule(betas: Any) -> NoiseSchedule:
    return NoiseSchedule(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0))


def schedule_from_diffusers(scheduler_config: dict[str, Any]) -> NoiseSchedule:
    """The training schedule in a diffusers ``scheduler_config.json`` (DDPM/DDIM scheduler) of an eps-prediction
    model (a ``prediction_type`` other than ``"epsilon"`` is refused: purifytf's backbones return eps)."""
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"the scheduler's model predicts {prediction!r}; purifytf's diffusion backbones are "
                         "eps-prediction networks (prediction_type 'epsilon')")
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 1e-4), scheduler_config.get("beta_end", 0.02)
    kind = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        return _betas_schedule(scheduler_config["trained_betas"])
    if kind == "linear":
        return NoiseSchedule.linear(steps, start, end)
    if kind == "scaled_linear":
        return _betas_schedule(torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2)
    if kind == "squaredcos_cap_v2":
        return cosine_schedule(steps)
    raise ValueError(f"unsupported diffusers beta_schedule {kind!r}")


def guided_diffusion_schedule(flags: dict[str, Any]) -> NoiseSchedule:
    """The schedule of guided-diffusion's flags ``noise_schedule`` (``linear``, scaled to T, or ``cosine``)."""
    steps = flags.get("diffusion_steps", 1000)
    kind = flags.get("noise_schedule", "linear")
    if kind == "linear":
        scale = 1000 / steps
        return NoiseSchedule.linear(steps, scale * 1e-4, scale * 0.02)
    if kind == "cosine":
        return cosine_schedule(steps)
    raise ValueError(f"unsupported guided-diffusion noise_schedule {kind!r}")
