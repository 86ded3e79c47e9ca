"""Model entry points: what ``torch.hub.load(repo, name, ...)`` calls (``hubconf.py`` re-exports them).

Every entry takes ``pretrained`` (load published weights), ``weights`` (a name from
:func:`purifytf.hub.list_weights`: the backbone and the data it was trained on) and the model's own
constructor arguments, which override the variant's settings. ``weights="fashion-mnist"`` is the
embedded default that ships inside the package (works offline); ``"ddpm-cifar10-32"`` and
``"guided-diffusion-256-uncond"`` are the papers' public backbones (downloaded once, then cached).
"""

from __future__ import annotations

import contextlib
import io
import json

from torch import nn

from .hub import companion_file, get_weights, load_backbone, model_card, untrained_backbone
from .models.classifiers import SmallCNN
from .purifiers.diffpure import DiffPurify
from .purifiers.impure import IMPurify
from .purifiers.saliency_diffpure import SaliencyDiffPurify
from .purifiers.ssni import SSNIPurify

__all__ = ["diff_purify", "fashion_mnist_cnn", "im_purify", "saliency_diff_purify", "ssni_purify"]

DEFAULT_WEIGHTS = "fashion-mnist"


def _from_dir(cls, directory, **kwargs):
    """``cls.from_pretrained(directory)`` without the mixin's "Loading weights from local directory" print."""
    with contextlib.redirect_stdout(io.StringIO()):
        return cls.from_pretrained(directory, **kwargs)


def _carded(purifier, weights: str):
    """``purifier`` with the Hub card metadata of ``weights`` (what ``save_pretrained`` writes)."""
    model_card(purifier, weights, metrics=["accuracy"])
    return purifier


def _backbone(pretrained: bool, weights: str):
    return load_backbone(weights) if pretrained else untrained_backbone(weights)


def fashion_mnist_cnn(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> nn.Module:
    """The embedded default's target classifier: :class:`~purifytf.models.SmallCNN` (0.46M parameters).

    Args:
        pretrained: load the bundled weights (92 %+ clean Fashion-MNIST test accuracy; see MODEL_CARD.md).
        weights: ``"fashion-mnist"`` (the only variant).
        **kwargs: ``SmallCNN`` arguments for an untrained model.
    Input (B, 1, 28, 28) in [0, 1]; output logits (B, 10). Returned in eval mode.
    """
    if not pretrained:
        return SmallCNN(**kwargs).eval()
    return _from_dir(SmallCNN, companion_file(weights, "classifier"), **kwargs).eval()


def diff_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> DiffPurify:
    """DiffPure (Nie et al., 2022): diffuse to ``t*``, then run the reverse diffusion chain.

    Args:
        pretrained: load the backbone's weights (bundled, or downloaded once and cached; offline with
            ``HF_HUB_OFFLINE=1`` from the cache only). ``False``: randomly initialised backbone.
        weights: ``"fashion-mnist"`` (bundled, 28x28 grey), ``"ddpm-cifar10-32"`` (Hugging Face
            ``google/ddpm-cifar10-32``) or ``"guided-diffusion-256-uncond"`` (OpenAI ImageNet 256x256).
        **kwargs: :class:`purifytf.DiffPurify` arguments (``t_star``, ``steps``, ``sampler``, ``seed``, ...),
            overriding the variant's paper settings.
    """
    purifier = DiffPurify(_backbone(pretrained, weights), **{**get_weights(weights).purifier_kwargs, **kwargs})
    return _carded(purifier, weights)


def saliency_diff_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS,
                         classifier: nn.Module | None = None, **kwargs) -> SaliencyDiffPurify:
    """Saliency-guided DiffPure: strong noise on the pixels the classifier attends to, weak noise elsewhere.

    Args:
        pretrained: load the backbone's weights (see ``diff_purify``).
        weights: backbone variant (see ``diff_purify``).
        classifier: the model whose saliency guides the noise; default for ``"fashion-mnist"``: the bundled
            ``fashion_mnist_cnn``; required for the other variants.
        **kwargs: ``SaliencyDiffPurify`` arguments (``t_l``, ``t_s``, ``mask``, ``spacing``, ...).
    """
    if classifier is None:
        if "classifier" not in get_weights(weights).companions:
            raise TypeError(f"saliency_diff_purify(weights={weights!r}) needs classifier=<the model to defend>")
        classifier = fashion_mnist_cnn(pretrained=pretrained, weights=weights)
    return _carded(SaliencyDiffPurify(_backbone(pretrained, weights), classifier, **kwargs), weights)


def ssni_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, base: nn.Module | None = None,
                **kwargs) -> SSNIPurify:
    """SSNI: per-sample noise levels from the score norm, wrapped around a diffusion purifier.

    Args:
        pretrained: load the backbone and, where bundled (``"fashion-mnist"``), the score-norm statistics
            of clean training images; elsewhere call ``calibrate`` before use.
        weights: backbone variant of the default ``base`` (see ``diff_purify``).
        base: the diffusion purifier to wrap (default: ``diff_purify(pretrained, weights)``).
        **kwargs: ``SSNIPurify`` arguments (``reweight``, ``tau``, ``bias``, ``eps_steps``, ``stats``, ...).
    """
    if base is None:
        base = diff_purify(pretrained=pretrained, weights=weights)
    if pretrained and "stats" not in kwargs and "ssni_stats" in get_weights(weights).companions:
        saved = json.loads(companion_file(weights, "ssni_stats").read_text())
        kwargs = {"eps_steps": saved.pop("eps_steps"), "stats": saved, **kwargs}
    return _carded(SSNIPurify(base, **kwargs), weights)


def im_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> IMPurify:
    """IMPure: reconstruct each patch group from the others with a masked autoencoder (one network call).

    Args:
        pretrained: load the bundled reconstruction network (``"fashion-mnist"``: tiny preset, both stages).
        weights: ``"fashion-mnist"`` (no other variant is published).
        **kwargs: ``IMPurify`` arguments (``preset``, ``in_channels``, ``image_t``, ``feature_t``, ``seed``, ...);
            with ``pretrained`` only the non-architecture ones (``image_t``, ``feature_t``, ``seed``).
    """
    if not pretrained:
        return IMPurify(**kwargs)
    return _carded(_from_dir(IMPurify, companion_file(weights, "impure"), **kwargs), weights)
