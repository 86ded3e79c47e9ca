"""Model entry points: what ``torch.hub.load(repo, name, ...)`` calls (``hubconf.py`` re-exports them).

Each entry is :func:`purifytf.create_purifier` of one method. ``pretrained`` loads published weights,
``weights`` (a name from :func:`purifytf.hub.list_weights`) picks the backbone and the data it was
trained on, and the model's own constructor arguments override the variant's settings.
``weights="fashion-mnist"`` is the embedded default that ships inside the package (works offline);
``"ddpm-cifar10-32"`` (Hugging Face, downloaded once, then cached) and ``"guided-diffusion-256-uncond"`` are the
papers' public backbones. No sha256 of the guided-diffusion file is recorded yet, so ``pretrained=True`` refuses to
download it unverified: load it with ``purifytf.hub.load_backbone("guided-diffusion-256-uncond", check_hash=False)``
and pass it as ``backbone=``.
"""

from __future__ import annotations

from .classifiers import fashion_mnist_cnn
from .factory import create_purifier
from .purifiers.diffpure import DiffPurify
from .purifiers.impure import IMPurify
from .purifiers.saliency_diffpure import SaliencyDiffPurify
from .purifiers.ssni import SSNIPurify

__all__ = ["diff_purify", "fashion_mnist_cnn", "im_purify", "saliency_diff_purify", "ssni_purify"]

DEFAULT_WEIGHTS = "fashion-mnist"


def diff_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> DiffPurify:
    """DiffPure (Nie et al., 2022): ``create_purifier(f"diffpure.{weights}", pretrained, **kwargs)``.

    ``pretrained``, ``weights``: see the module doc.
    ``kwargs``: :class:`purifytf.DiffPurify` arguments (``t_star``, ``steps``, ``sampler``, ``seed``, ...).
    """
    return create_purifier(f"diffpure.{weights}", pretrained, **kwargs)


def saliency_diff_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> SaliencyDiffPurify:
    """Saliency-guided DiffPure: ``create_purifier(f"saliency_diffpure.{weights}", pretrained, **kwargs)``.

    ``pretrained``, ``weights``: see the module doc.
    ``kwargs``: ``classifier`` (default for ``"fashion-mnist"``: the bundled ``fashion_mnist_cnn``; required
    for the other weights) and :class:`purifytf.SaliencyDiffPurify` arguments.
    """
    return create_purifier(f"saliency_diffpure.{weights}", pretrained, **kwargs)


def ssni_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> SSNIPurify:
    """SSNI on DiffPure: ``create_purifier(f"ssni_diffpure.{weights}", pretrained, **kwargs)``; with
    ``pretrained`` and the bundled default, calibrated by the shipped score-norm statistics (elsewhere
    call ``calibrate``).

    ``pretrained``, ``weights``: see the module doc.
    ``kwargs``: :class:`purifytf.SSNIPurify` arguments; the others go to the base ``DiffPurify``.
    """
    return create_purifier(f"ssni_diffpure.{weights}", pretrained, **kwargs)


def im_purify(pretrained: bool = False, weights: str = DEFAULT_WEIGHTS, **kwargs) -> IMPurify:
    """IMPure: ``create_purifier(f"impure.{weights}", pretrained, **kwargs)`` (bundled ``pretrained`` weights
    for ``weights="fashion-mnist"`` only).

    ``pretrained``, ``weights``: see the module doc.
    ``kwargs``: :class:`purifytf.IMPurify` arguments; with ``pretrained`` only the non-architecture ones
    (``image_t``, ``feature_t``, ``seed``).
    """
    return create_purifier(f"impure.{weights}", pretrained, **kwargs)
