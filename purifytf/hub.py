"""Pretrained weights: a registry of where each checkpoint lives, and safe downloading and loading.

Each :class:`Weights` entry names a Hugging Face repo (pinned ``revision``) or a URL with its
sha256, the checkpoint's layout (:data:`~purifytf.checkpoints.FORMATS`) and the backbone config it
fills. Hugging Face files go through ``huggingface_hub`` (its cache, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``/``local_files_only``); URL files go to ``torch.hub``'s checkpoint folder and are
checked against their sha256. Offline, a file missing from the cache fails at once with a message
saying how to get it. Files are read with safetensors or ``torch.load(weights_only=True)`` only.

>>> backbone = load_backbone("ddpm-cifar10-32")              # doctest: +SKIP
>>> purifier = DiffPurify(backbone, **get_weights("ddpm-cifar10-32").purifier_kwargs)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import ModelCard, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .checkpoints import convert_state_dict, load_state_dict_file
from .diffusion.backbones import Backbone, build_backbone, schedule_from_config
from .diffusion.guided_unet import unet_kwargs_from_flags

__all__ = [
    "GUIDED_DIFFUSION_256_UNCOND_SHA256",
    "Weights",
    "get_weights",
    "list_weights",
    "load_backbone",
    "model_card",
    "register_weights",
    "untrained_backbone",
    "weights_file",
]


@dataclass(frozen=True)
class Weights:
    """Where one pretrained checkpoint lives and what it builds.

    Args:
        name: registry key.
        config: :func:`~purifytf.diffusion.build_backbone` config of the network the file fills.
        format: the file's state_dict layout, a key of :data:`purifytf.checkpoints.FORMATS`.
        repo_id, revision, filenames: Hugging Face source; ``filenames`` are tried in order (paths
            inside the repo), the first one the repo has is used.
        url, sha256: direct-download source and the file's sha256 (``None``: unknown, so a download
            needs ``check_hash=False``).
        purifier_kwargs: purifier settings the papers pair with this backbone (e.g. DiffPure's ``t_star``).
        card: model-card metadata (``datasets``, ``license``, ``base_model``, ``paper``, ``description``).
    """

    name: str
    config: dict[str, Any]
    format: str = "purifytf"
    repo_id: str | None = None
    revision: str = "main"
    filenames: tuple[str, ...] = ("model.safetensors",)
    url: str | None = None
    sha256: str | None = None
    purifier_kwargs: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if (self.repo_id is None) == (self.url is None):
            raise ValueError(f"weights {self.name!r}: give exactly one of repo_id and url")


_REGISTRY: dict[str, Weights] = {}


def register_weights(weights: Weights) -> Weights:
    """Add ``weights`` to the registry under ``weights.name`` (names are unique)."""
    if weights.name in _REGISTRY:
        raise ValueError(f"weights {weights.name!r} are already registered")
    _REGISTRY[weights.name] = weights
    return weights


def list_weights() -> list[str]:
    """Names of the registered weights."""
    return sorted(_REGISTRY)


def get_weights(name: str | Weights) -> Weights:
    if isinstance(name, Weights):
        return name
    if name not in _REGISTRY:
        raise KeyError(f"unknown weights {name!r}; registered: {list_weights()}")
    return _REGISTRY[name]


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    env = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if env is None else env.strip().upper() in constants.ENV_VARS_TRUE_VALUES


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hf_file(w: Weights, cache_dir: str | Path | None, offline: bool) -> Path:
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    for filename in w.filenames:
        try:
            return Path(hf_hub_download(w.repo_id, filename, revision=w.revision, cache_dir=cache_dir,
                                        local_files_only=offline))
        except EntryNotFoundError:  # not in the cache (offline) or not in the repo: try the next name
            continue
    how = "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "it could not be downloaded"
    raise FileNotFoundError(
        f"weights {w.name!r}: none of {list(w.filenames)} from Hugging Face repo {w.repo_id!r} (revision "
        f"{w.revision!r}) is in the cache {str(cache_dir)!r}, and {how}. On a machine with internet run "
        f"`hf download {w.repo_id} {w.filenames[0]} --revision {w.revision}` (or load once with HF_HUB_OFFLINE "
        f"unset), then copy the cache and point HF_HUB_CACHE (or cache_dir=) at it.")


def _url_file(w: Weights, cache_dir: str | Path | None, offline: bool, check_hash: bool) -> Path:
    if check_hash and w.sha256 is None:
        raise ValueError(f"weights {w.name!r}: no sha256 is recorded for {w.url}, so the download cannot be "
                         f"verified; pass check_hash=False to accept it unverified")
    path = Path(cache_dir or Path(torch.hub.get_dir()) / "checkpoints") / Path(urlparse(w.url).path).name
    if not path.exists():
        if offline:
            raise FileNotFoundError(f"weights {w.name!r}: {path} is missing and downloads are off (HF_HUB_OFFLINE=1 "
                                    f"or local_files_only=True); download {w.url} to that path")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(w.url, str(path), hash_prefix=w.sha256 if check_hash else None)
    elif check_hash and _sha256(path) != w.sha256:
        raise ValueError(f"weights {w.name!r}: {path} does not match the recorded sha256 {w.sha256}; "
                         f"delete it to download it again")
    return path


def weights_file(
    weights: str | Weights,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    check_hash: bool = True,
) -> Path:
    """Local path of a registered checkpoint, downloaded (and verified) on first use.

    Args:
        weights: a registered name or a :class:`Weights`.
        cache_dir: Hugging Face cache (default ``HF_HUB_CACHE``) or, for URL weights, the folder of the
            file (default ``<torch.hub.get_dir()>/checkpoints``).
        local_files_only: never download (default: ``HF_HUB_OFFLINE``).
        check_hash: verify URL downloads against their sha256 (refuses when none is recorded).
    """
    w = get_weights(weights)
    offline = _offline(local_files_only)
    if w.repo_id is not None:
        return _hf_file(w, cache_dir, offline)
    return _url_file(w, cache_dir, offline, check_hash)


def untrained_backbone(weights: str | Weights) -> Backbone:
    """The backbone of ``weights``' architecture and schedule, randomly initialised (nothing downloaded)."""
    return build_backbone(get_weights(weights).config)


def load_backbone(
    weights: str | Weights,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    check_hash: bool = True,
    map_location: str | torch.device = "cpu",
) -> Backbone:
    """Build the backbone of registered ``weights`` and load its checkpoint with ``strict=True``.

    The network is built on the ``meta`` device (no random initialisation), so loading costs about one
    copy of the weights. Other arguments: see :func:`weights_file`.
    """
    w = get_weights(weights)
    path = weights_file(w, cache_dir=cache_dir, local_files_only=local_files_only, check_hash=check_hash)
    state = convert_state_dict(w.format, load_state_dict_file(path))
    with torch.device("meta"):
        backbone = build_backbone(w.config)
    backbone.to_empty(device=map_location)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{path} does not fit weights {w.name!r} ({w.format} layout): {err}") from err
    backbone.schedule = schedule_from_config(w.config.get("schedule")).to(map_location)  # to_empty wiped it
    return backbone.eval()


def model_card(purifier: Any, weights: str | Weights | None = None, **card_data: Any) -> ModelCard:
    """The purifier's Hub card (``library_name``, ``tags`` from the mixin) plus the metadata of its backbone
    ``weights`` (``datasets``, ``license``, ``base_model``) and ``card_data`` (e.g. ``metrics``).

    Save it as ``README.md`` in the folder before ``save_pretrained`` (which keeps an existing card), or
    ``card.push_to_hub(repo_id)``.
    """
    card = purifier.generate_model_card()
    meta = dict(get_weights(weights).card) if weights is not None else {}
    meta.update(card_data)
    for key in ("datasets", "license", "base_model", "metrics", "pipeline_tag"):
        if key in meta:
            setattr(card.data, key, meta[key])
    return card


# --- the registry ---------------------------------------------------------------------------------

GUIDED_DIFFUSION_256_UNCOND_SHA256: str | None = None
"""sha256 of OpenAI's ``256x256_diffusion_uncond.pt``: NOT KNOWN YET (it was not reachable when this was
written). Someone with internet must fill it (``sha256sum 256x256_diffusion_uncond.pt``); until then
loading those weights needs ``check_hash=False``."""

_GUIDED_256_UNCOND_FLAGS = {
    "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "num_heads": 4, "num_head_channels": 64,
    "attention_resolutions": "32,16,8", "channel_mult": "", "dropout": 0.0, "class_cond": False,
    "use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": False, "learn_sigma": True,
}

register_weights(Weights(
    name="ddpm-cifar10-32",
    repo_id="google/ddpm-cifar10-32",
    revision="main",  # pin to a commit hash once one is verified online
    filenames=("diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
               "diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.bin"),
    format="diffusers_unet",
    config={
        "kind": "diffusers_unet2d",
        "schedule": {"kind": "linear", "num_steps": 1000},  # scheduler_config.json: linear 1e-4 .. 0.02
        "unet": {  # the repo's config.json
            "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
            "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                               "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        },
    },
    purifier_kwargs={"t_star": 0.1},
    card={"datasets": ["cifar10"], "license": "apache-2.0", "base_model": "google/ddpm-cifar10-32",
          "paper": "https://arxiv.org/abs/2006.11239",
          "description": "DDPM (Ho et al., 2020) eps-prediction UNet, unconditional CIFAR-10 32x32, 35.7M parameters"},
))

register_weights(Weights(
    name="guided-diffusion-256-uncond",
    url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    sha256=GUIDED_DIFFUSION_256_UNCOND_SHA256,
    format="guided_diffusion",
    config={
        "kind": "guided_diffusion_unet",
        "schedule": {"kind": "linear", "num_steps": 1000},
        "unet": unet_kwargs_from_flags(_GUIDED_256_UNCOND_FLAGS),
    },
    purifier_kwargs={"t_star": 0.15},
    card={"datasets": ["imagenet-1k"], "license": "mit", "paper": "https://arxiv.org/abs/2105.05233",
          "description": "guided-diffusion (Dhariwal & Nichol, 2021) unconditional ImageNet 256x256 UNet with "
                         "learned sigma, 552.8M parameters; DiffPure's ImageNet backbone"},
))
