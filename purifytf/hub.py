"""Pretrained weights: a registry of where each checkpoint lives, and safe downloading and loading.

Each :class:`Weights` entry names a Hugging Face repo (pinned ``revision``), a URL with its
sha256, or a file bundled with the package (:data:`ASSETS`: the embedded Fashion-MNIST default),
plus the checkpoint's layout (:data:`~purifytf.checkpoints.FORMATS`) and the backbone config it
fills. Hugging Face files go through ``huggingface_hub`` (its cache, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``/``local_files_only``); URL files go to ``torch.hub``'s checkpoint folder and are
checked against their sha256. Offline, a file missing from the cache fails at once with a message
saying how to get it. Files are read with safetensors or ``torch.load(weights_only=True)`` only.

>>> backbone = load_backbone("ddpm-cifar10-32")              # doctest: +SKIP
>>> purifier = DiffPurify(backbone, **get_weights("ddpm-cifar10-32").purifier_settings["diffpure"])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import ModelCard, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .checkpoints import FORMATS, convert_state_dict, load_state_dict_file
from .config import read_config, set_downloader
from .diffusion.backbones import Backbone, build_backbone, schedule_from_config
from .diffusion.guided_unet import unet_kwargs_from_flags
from .diffusion.score_sde import SCORE_SDE_CIFAR10_CONFIG

__all__ = [
    "ASSETS",
    "GUIDED_DIFFUSION_256_UNCOND_SHA256",
    "Weights",
    "WeightsUnavailableError",
    "backbone_config",
    "get_weights",
    "hub_download",
    "list_weights",
    "load_backbone",
    "load_backbone_dir",
    "model_card",
    "register_weights",
    "bundled_file",
    "companion_file",
    "untrained_backbone",
    "weights_file",
]


PURIFIER_METHODS = ("diffpure", "saliency_diffpure", "ssni")
"""The methods whose settings :attr:`Weights.purifier_settings` may pair with a backbone."""


@dataclass(frozen=True)
class Weights:
    """Where one pretrained checkpoint lives and what it builds.

    Args:
        name: registry key.
        config: :attr:`~purifytf.diffusion.Backbone.config` of the network the file fills (``None`` for
            bundled weights: the ``config.json`` saved beside the file, see :func:`backbone_config`).
        format: the file's state_dict layout, a key of :data:`purifytf.checkpoints.FORMATS`.
        repo_id, revision, filenames: Hugging Face source; ``filenames`` are tried in order (paths
            inside the repo), the first one the repo has is used.
        url, sha256: direct-download source and the file's sha256 (``None``: unknown, so a download
            needs ``check_hash=False``).
        bundled: path of a file shipped inside the package, relative to :data:`ASSETS`.
            No source at all: no verified download is known; load a local copy with ``path=``.
        companions: models trained for the same data, bundled: ``{"classifier" | "impure" | "ssni_stats":
            path relative to ASSETS}`` (the target classifier, IMPurify, SSNI's score-norm statistics).
        purifier_settings: method (``"diffpure"``, ``"saliency_diffpure"``, ``"ssni"``) -> the settings paired
            with these weights where they differ from the class defaults: the papers' for published weights
            (noise levels and masks; SaliencyDiffPurify keeps its 10-call grid, ``spacing=20``, on every
            weights: the papers' grid is ``spacing=2``), the study's for the embedded default (its
            ``purifiers.json``, shipped beside the weights).
        card: model-card metadata (``datasets``, ``license``, ``base_model``, ``paper``, ``description``).
    """

    name: str
    config: dict[str, Any] | None = None
    format: str = "purifytf"
    repo_id: str | None = None
    revision: str = "main"
    filenames: tuple[str, ...] = ("model.safetensors",)
    url: str | None = None
    sha256: str | None = None
    bundled: str | None = None
    companions: dict[str, str] = field(default_factory=dict)
    purifier_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if sum(source is not None for source in (self.repo_id, self.url, self.bundled)) > 1:
            raise ValueError(f"weights {self.name!r}: give at most one of repo_id, url and bundled")
        if self.format not in FORMATS:
            raise ValueError(f"weights {self.name!r}: unknown format {self.format!r}; known: {sorted(FORMATS)}")
        unknown = set(self.purifier_settings) - set(PURIFIER_METHODS)
        if unknown:
            raise ValueError(f"weights {self.name!r}: purifier_settings for unknown methods {sorted(unknown)}; "
                             f"known: {PURIFIER_METHODS}")


ASSETS = Path(__file__).parent / "assets"
"""Models and data shipped inside the package (written by ``examples/train_fashion_mnist.py``)."""

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


class WeightsUnavailableError(FileNotFoundError):
    """Hub files or registered weights that are neither in the local cache nor downloadable now."""


_PROBE_SECONDS = 3.0
"""A server that has not answered one HEAD request by then counts as unreachable (huggingface_hub would
retry for about 20 s more)."""


def _unreachable(url: str) -> str | None:
    """Why the server of ``url`` cannot be reached now (one request, no retries), or ``None`` if it answers."""
    import urllib.error
    import urllib.request

    parts = urlparse(url)
    if parts.scheme not in ("http", "https"):
        return None  # file:// and other local sources
    try:
        urllib.request.urlopen(urllib.request.Request(f"{parts.scheme}://{parts.netloc}/", method="HEAD"),
                               timeout=_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return None  # the server answered, even if with an error status
    except (OSError, ValueError) as err:  # URLError, refused connections, timeouts
        return f"{parts.netloc} cannot be reached ({getattr(err, 'reason', err)})"
    return None


_DOWNLOADS_OFF = "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)"


def _unavailable(what: str, source: str, offline: bool, reason: str, local: str, download: str,
                 cache: str = "point HF_HUB_CACHE (or cache_dir=) at it") -> WeightsUnavailableError:
    """The loading error every path raises: what failed, why, and the three ways out (``cache``: where a copied
    cache goes)."""
    switch = " (unset HF_HUB_OFFLINE, drop local_files_only=True)" if offline else ""
    return WeightsUnavailableError(
        f"cannot load {what}: {source} is not in the local cache and {reason}. "
        f"Offline mode is {'on' if offline else 'off'} (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
        f"Ways out: (1) connect to the internet{switch} and load again; (2) pre-download it into the cache on a "
        f"machine with internet: {download}, then copy the cache here and {cache}; (3) pass a local directory or "
        f"file instead: {local}.")


def hub_download(repo_id: str, filenames: str | tuple[str, ...], *, revision: str | None = None,
                 cache_dir: str | Path | None = None, local_files_only: bool | None = None,
                 what: str | None = None, local: str | None = None, **kwargs: Any) -> Path:
    """Local path of the first of ``filenames`` that Hugging Face repo ``repo_id`` has: cached or downloaded.

    Every Hub download of purifytf goes through here (``from_pretrained`` of purifiers and backbones,
    registered weights, the factory and ``torch.hub`` entry points). Offline (``local_files_only``, default
    ``HF_HUB_OFFLINE``) only the cache is read; online, an endpoint that does not answer within
    :data:`_PROBE_SECONDS` is not retried. A file neither cached nor downloadable raises
    :class:`WeightsUnavailableError` naming the repo, the revision, the offline mode and the ways out.
    ``what`` names the object for the message (default: the repo), ``local`` how to load it from disk;
    ``kwargs`` go to ``hf_hub_download`` (``token``, ``force_download``).
    """
    filenames = (filenames,) if isinstance(filenames, str) else tuple(filenames)
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    offline = _offline(local_files_only or None)  # False cannot override HF_HUB_OFFLINE (nor can it in huggingface_hub)
    reason = _DOWNLOADS_OFF if offline else _unreachable(constants.ENDPOINT)
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=reason is not None, **kwargs))
        except LocalEntryNotFoundError as error:
            if reason is None:  # online: the request failed (connection or server error), not a missing file
                reason = f"the Hub at {constants.ENDPOINT} could not be queried ({error})"
                break
            continue  # offline: not cached, try the next name
        except EntryNotFoundError:  # not in the repo: try the next name
            continue
        except RevisionNotFoundError:
            reason = f"the Hub at {constants.ENDPOINT} has no such revision"
            break
        except RepositoryNotFoundError:
            reason = f"the Hub at {constants.ENDPOINT} has no such repository (or it is private: `hf auth login`)"
            break
    files, revision = " or ".join(repr(f) for f in filenames), revision or "main"
    source = f"file {files} of Hugging Face repo {repo_id!r}, revision {revision!r} (cache {str(cache_dir)!r})"
    raise _unavailable(what or f"Hugging Face repo {repo_id!r}", source, offline,
                       reason or "the repo has none of these files",
                       local or f"Purifier.from_pretrained(DIRECTORY), the folder save_pretrained wrote (or "
                                f"`hf download {repo_id} --local-dir DIRECTORY`)",
                       f"`hf download {repo_id} --revision {revision}`")


def _hf_file(w: Weights, cache_dir: str | Path | None, offline: bool, check_hash: bool) -> Path:
    path = hub_download(w.repo_id, w.filenames, revision=w.revision, cache_dir=cache_dir, local_files_only=offline,
                        what=f"weights {w.name!r}", local=f"load_backbone({w.name!r}, path=FILE)")
    if check_hash and w.sha256 is not None:
        _check_sha256(w, path)
    return path


def _check_sha256(w: Weights, path: Path) -> None:
    if _sha256(path) != w.sha256:
        raise ValueError(f"weights {w.name!r}: {path} does not match the recorded sha256 {w.sha256}; "
                         f"delete it to download it again")


def _url_file(w: Weights, cache_dir: str | Path | None, offline: bool, check_hash: bool) -> Path:
    if check_hash and w.sha256 is None:
        raise ValueError(f"weights {w.name!r}: no sha256 is recorded for {w.url}, so the download cannot be "
                         f"verified; to accept it unverified, load it with load_backbone({w.name!r}, "
                         f"check_hash=False) and pass it to the purifier (create_purifier(..., backbone=...))")
    path = Path(cache_dir or Path(torch.hub.get_dir()) / "checkpoints") / Path(urlparse(w.url).path).name
    if not path.exists():
        reason = _DOWNLOADS_OFF if offline else _unreachable(w.url)
        if reason is not None:
            raise _unavailable(f"weights {w.name!r}", f"{w.url} (expected at {path})", offline, reason,
                               f"load_backbone({w.name!r}, path=FILE)", f"download {w.url} to {path}",
                               f"put the file in {path.parent} (TORCH_HOME, or cache_dir=)")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(w.url, str(path), hash_prefix=w.sha256 if check_hash else None)
    elif check_hash:
        _check_sha256(w, path)
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
        local_files_only: never download (default: ``HF_HUB_OFFLINE``). ``False`` lets URL weights download
            even under ``HF_HUB_OFFLINE=1`` (a Hugging Face setting); Hugging Face weights stay offline then,
            as in ``huggingface_hub``.
        check_hash: verify the file against its recorded sha256 (URL weights without one are refused; Hugging Face
            weights without one rely on the Hub's revision).
    """
    w = get_weights(weights)
    if w.bundled is not None:
        return bundled_file(w.bundled)
    offline = _offline(local_files_only)
    if w.repo_id is not None:
        return _hf_file(w, cache_dir, offline, check_hash)
    if w.url is not None:
        return _url_file(w, cache_dir, offline, check_hash)
    raise FileNotFoundError(f"weights {w.name!r}: no verified download source is recorded ({w.card.get('source')}); "
                            f"download the file yourself and pass path= (e.g. load_backbone({w.name!r}, path=...))")


def bundled_file(relative: str | Path) -> Path:
    """Path of a file shipped in :data:`ASSETS`; a clear error if this install lacks it."""
    path = ASSETS / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from this purifytf install: reinstall the package, or "
                                f"rebuild the embedded models with `python examples/train_fashion_mnist.py`")
    return path


def companion_file(weights: str | Weights, name: str) -> Path:
    """Path of a bundled companion of ``weights`` (``"classifier"``, ``"impure"``, ``"ssni_stats"``, ...)."""
    w = get_weights(weights)
    if name not in w.companions:
        raise KeyError(f"weights {w.name!r} have no bundled {name}; bundled companions: {sorted(w.companions)} "
                       f"(the embedded default 'fashion-mnist' has them all)")
    return bundled_file(w.companions[name])


def backbone_config(weights: str | Weights, **download: Any) -> dict[str, Any]:
    """The backbone config of ``weights``: the registered one, else the ``config.json`` beside bundled weights or in
    a Hub repo that ``Backbone.save_pretrained`` / ``push_to_hub`` wrote (``purifytf`` format; ``download``:
    ``cache_dir`` and ``local_files_only``, as for :func:`weights_file`)."""
    w = get_weights(weights)
    if w.config is not None:
        return w.config
    if w.bundled is not None:
        return read_config(bundled_file(w.bundled).parent)
    if w.repo_id is not None and w.format == "purifytf":
        return read_config(w.repo_id, revision=w.revision, **download)
    raise ValueError(f"weights {w.name!r} record no backbone config")


def untrained_backbone(weights: str | Weights) -> Backbone:
    """The backbone of ``weights``' architecture and schedule, randomly initialised (nothing downloaded)."""
    return build_backbone(backbone_config(weights))


def _load_strict(config: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                 map_location: str | torch.device) -> Backbone:
    """Build the backbone of ``config`` on the meta device (no random init) and fill it with ``strict=True``."""
    with torch.device("meta"):
        backbone = build_backbone(config)
    backbone.to_empty(device=map_location)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{source} does not fit its backbone config: {err}") from err
    backbone.schedule = schedule_from_config(config.get("schedule")).to(map_location)  # to_empty wiped it
    backbone.max_t = config.get("max_t")  # the schedule was replaced: restate the trained range
    return backbone.eval()


def load_backbone(
    weights: str | Weights,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    check_hash: bool = True,
    map_location: str | torch.device = "cpu",
    path: str | Path | None = None,
) -> Backbone:
    """Build the backbone of registered ``weights`` and load its checkpoint with ``strict=True``.

    The network is built on the ``meta`` device (no random initialisation), so loading costs about one
    copy of the weights. ``path``: a local copy of the checkpoint file (nothing is downloaded or
    hashed); other arguments: see :func:`weights_file`.
    """
    w = get_weights(weights)
    if path is None:
        path = weights_file(w, cache_dir=cache_dir, local_files_only=local_files_only, check_hash=check_hash)
    state = convert_state_dict(w.format, load_state_dict_file(path))
    config = backbone_config(w, cache_dir=cache_dir, local_files_only=_offline(local_files_only))
    return _load_strict(config, state, f"{path} (weights {w.name!r}, {w.format} layout)", map_location)


def load_backbone_dir(directory: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """A backbone saved with ``save_pretrained`` (what the DDPM recipe writes): ``Backbone.from_pretrained``."""
    return Backbone.from_pretrained(directory, map_location=str(map_location))


def model_card(purifier: Any, weights: str | Weights | None = None, *, eval_run: str | Path | None = None,
               **card_data: Any) -> ModelCard:
    """Set the purifier's Hub card metadata (``purifier.card_data``) from its backbone ``weights``
    (``datasets``, ``license``, ``base_model``), an ``eval_run`` (the ``--output`` folder of ``purifytf eval``:
    its results as the card's ``model-index``) and ``card_data`` (e.g. ``metrics``); return its card.

    ``save_pretrained``/``push_to_hub`` then write the same card as ``README.md``.
    """
    if eval_run is not None:
        from .evaluation.report import card_data as eval_card_data

        card_data = {**eval_card_data(eval_run), **card_data}
    meta = {k: v for k, v in (get_weights(weights).card if weights is not None else {}).items()
            if k in purifier.CARD_KEYS}
    purifier.card_data = {**purifier.card_data, **meta, **card_data}
    return purifier.generate_model_card()


set_downloader(hub_download)

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
        "_class_name": "DiffusersUNet",
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
    purifier_settings={"diffpure": {"t_star": 0.1}},
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
        "_class_name": "GuidedDiffusionUNet",
        "schedule": {"kind": "linear", "num_steps": 1000},
        "unet": unet_kwargs_from_flags(_GUIDED_256_UNCOND_FLAGS),
    },
    purifier_settings={"diffpure": {"t_star": 0.15},  # ALGORITHMS.md: the papers' ImageNet settings
                       "saliency_diffpure": {"t_l": 0.4, "t_s": 0.2, "mask": "topk", "fraction": 0.15,
                                             "resample_steps": 3, "spacing": 2},  # the reference's grid: 200 NFE
                       "ssni": {"eps_steps": 50}},
    card={"datasets": ["imagenet-1k"], "license": "mit", "paper": "https://arxiv.org/abs/2105.05233",
          "description": "guided-diffusion (Dhariwal & Nichol, 2021) unconditional ImageNet 256x256 UNet with "
                         "learned sigma, 552.8M parameters; DiffPure's ImageNet backbone"},
))

register_weights(Weights(
    name="score-sde-cifar10-ddpmpp-deep-continuous",
    format="score_sde",
    config=SCORE_SDE_CIFAR10_CONFIG,
    purifier_settings={"diffpure": {"t_star": 0.1}},
    card={"datasets": ["cifar10"], "license": "apache-2.0", "paper": "https://arxiv.org/abs/2011.13456",
          "source": "score_sde_pytorch release, vp/cifar10_ddpmpp_deep_continuous/checkpoints/checkpoint_8.pth",
          "description": "score_sde DDPM++ deep (Song et al., 2021), continuous VP SDE, CIFAR-10 32x32, 106.6M "
                         "parameters, EMA weights; DiffPure's CIFAR-10 backbone"},
))

register_weights(Weights(
    name="fashion-mnist",
    bundled="fashion-mnist/ddpm/model.safetensors",  # config: fashion-mnist/ddpm/config.json
    companions={"classifier": "fashion-mnist/classifier", "impure": "fashion-mnist/impure",
                "ssni_stats": "fashion-mnist/ssni/stats.json", "test_slice": "fashion-mnist/test-slice.npz"},
    purifier_settings=json.loads((ASSETS / "fashion-mnist/purifiers.json").read_text()),
    card={"datasets": ["zalando-datasets/fashion_mnist"], "license": "apache-2.0",
          "description": "purifytf's embedded default: eps-prediction DDPM UNet (0.99M parameters), Fashion-MNIST "
                         "28x28 grey, linear schedule, trained on t <= 400 by examples/train_fashion_mnist.py"},
))
