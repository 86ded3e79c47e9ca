"""torch.hub entry points of purifytf.

>>> purifier = torch.hub.load("purifytf/purifytf", "diff_purify", pretrained=True)  # doctest: +SKIP

Every entry takes ``pretrained`` (load published weights; entries with none published yet raise),
``weights`` (which variant: a name from ``purifytf.hub.list_weights()``) and the purifier's own
constructor arguments. Purifier modules are imported inside the entries, so each one works on its own.
Bundled classifiers (none yet) get one entry each in the same way: ``def <name>(pretrained=False,
weights=None, **kwargs)`` returning the ``nn.Module``, with its weights registered in ``purifytf.hub``.
"""

import importlib
import inspect

dependencies = ["torch", "torchvision", "huggingface_hub", "safetensors", "diffusers"]


def _no_published_weights(name: str) -> RuntimeError:
    return RuntimeError(
        f"no pretrained purifytf weights are published for {name} yet; use pretrained=False for an untrained "
        f"model (pass backbone=purifytf.hub.load_backbone(...) to start from a pretrained diffusion backbone)")


def _purifier(module: str, cls_name: str, pretrained: bool, weights: str | None, kwargs: dict):
    """Build ``purifytf.purifiers.<module>.<cls_name>`` untrained; a ``backbone`` argument defaults to an
    untrained network of ``weights``' architecture."""
    if pretrained:
        raise _no_published_weights(cls_name)
    cls = getattr(importlib.import_module(f"purifytf.purifiers.{module}"), cls_name)
    if "backbone" in inspect.signature(cls).parameters and "backbone" not in kwargs:
        from purifytf.hub import untrained_backbone

        kwargs["backbone"] = untrained_backbone(weights)
    return cls(**kwargs)


def diff_purify(pretrained: bool = False, weights: str = "ddpm-cifar10-32", **kwargs):
    """DiffPure (Nie et al., 2022): diffuse to ``t*``, then run the reverse diffusion chain.

    Args:
        pretrained: load the backbone's published weights (downloaded once, then cached; offline with
            ``HF_HUB_OFFLINE=1`` from the cache only). ``False``: randomly initialised backbone.
        weights: backbone variant: ``"ddpm-cifar10-32"`` (Hugging Face ``google/ddpm-cifar10-32``, CIFAR-10,
            ``t_star=0.1``) or ``"guided-diffusion-256-uncond"`` (OpenAI ImageNet 256x256, ``t_star=0.15``).
        **kwargs: :class:`purifytf.DiffPurify` arguments (``t_star``, ``steps``, ``sampler``, ``seed``, ...),
            overriding the variant's paper settings.
    """
    from purifytf.hub import get_weights, load_backbone, untrained_backbone
    from purifytf.purifiers.diffpure import DiffPurify

    w = get_weights(weights)
    backbone = load_backbone(w) if pretrained else untrained_backbone(w)
    return DiffPurify(backbone, **{**w.purifier_kwargs, **kwargs})


def saliency_diff_purify(pretrained: bool = False, weights: str = "ddpm-cifar10-32", **kwargs):
    """Saliency-guided DiffPure: strong noise on the pixels the classifier attends to, weak noise elsewhere.

    Args:
        pretrained: no purifytf weights are published yet: ``True`` raises.
        weights: architecture of the untrained backbone (see ``diff_purify``), unless ``backbone=`` is given.
        **kwargs: ``SaliencyDiffPurify`` arguments; ``classifier`` is required.
    """
    return _purifier("saliency_diffpure", "SaliencyDiffPurify", pretrained, weights, kwargs)


def ssni_purify(pretrained: bool = False, weights: str = "ddpm-cifar10-32", **kwargs):
    """SSNI: per-sample noise levels from the score norm, wrapped around a diffusion purifier.

    Args:
        pretrained: no calibrated purifytf weights are published yet: ``True`` raises.
        weights: backbone architecture of the default ``base`` (an untrained ``diff_purify``).
        **kwargs: ``SSNIPurify`` arguments (``base``, ``reweight``, ``tau``, ``stats``, ...).
    """
    if not pretrained and "base" not in kwargs:
        kwargs["base"] = diff_purify(pretrained=False, weights=weights)
    return _purifier("ssni", "SSNIPurify", pretrained, weights, kwargs)


def im_purify(pretrained: bool = False, weights: str | None = None, **kwargs):
    """IMPure: reconstruct each patch group from the others with a masked autoencoder (one network call).

    Args:
        pretrained: no purifytf weights are published yet: ``True`` raises.
        weights: no variants are published yet: must be ``None``.
        **kwargs: ``IMPurify`` arguments (``preset``, ``in_channels``, ``image_t``, ``feature_t``, ...).
    """
    if weights is not None:
        raise _no_published_weights(f"IMPurify (weights={weights!r})")
    return _purifier("impure", "IMPurify", pretrained, weights, kwargs)
