"""Building purifiers, classifiers and normalisations from the command line's strings.

- Purifier: ``none``; a name of :func:`purifytf.list_purifiers` with its pretrained weights
  (``create_purifier(name, pretrained=True, **options)``); a saved directory or Hub repo id, loaded with
  ``purifytf.load_purifier(path, **options)`` (``config.json`` names the class; a class given as
  well is checked against it); or a Python entry ``module:function`` called as ``function(**options)``.
  Shared with ``purifytf purify``.
- Classifier: :func:`purifytf.classifiers.load_classifier` (``timm:NAME`` or a bare timm name,
  ``torchvision:NAME``, ``purifytf:NAME``, ``module:function``; a weights file), shared with ``purifytf train``.
- Normalisation: ``auto`` (timm's ``pretrained_cfg``), ``none``, a torchvision weights name
  (``ResNet50_Weights.IMAGENET1K_V2``) or ``MEAN,...:STD,...``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn
from torchvision.transforms import v2

from ..classifiers import entry_point, load_classifier
from ..defended import adapt_normalization, input_channels, resolve_normalization

__all__ = ["is_saved_purifier", "load_classifier", "load_purifier", "parse_normalize", "parse_options",
           "unit_input_classifier"]


def _is_entry_point(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def is_saved_purifier(spec: str) -> bool:
    """Whether ``spec`` names a saved directory or Hub repo id (not ``none``, a listed name or ``module:function``)."""
    from ..factory import list_purifiers

    return (spec != "none" and not _is_entry_point(spec) and spec not in list_purifiers()
            and (Path(spec).expanduser().is_dir() or spec.count("/") == 1))


def parse_options(items: list[str] | None) -> dict:
    """``["steps=10", "sampler=ddim"]`` -> ``{"steps": 10, "sampler": "ddim"}`` (values JSON, else strings)."""
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"options are KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_purifier(spec: str, cls: str | None = None, options: dict | None = None, checkpoint: bool = False,
                  seed: int | None = None, classifier: nn.Module | None = None) -> nn.Module | None:
    """The purifier ``spec`` names (``None`` for ``"none"``); see the module doc.

    ``checkpoint`` switches on gradient checkpointing in every part that has it (also purifiers
    wrapped by others); ``seed`` makes the purifier deterministic (``Purifier.seed``). ``classifier``: what a
    saliency purifier looks at: a named variant's saliency reads ``classifier`` itself (the defended classifier);
    for a saved directory or repo id it is the architecture of the saved classifier (a copy receives the saved
    weights, ``classifier`` itself is not changed); unused by other purifiers.
    """
    options = options or {}
    if spec == "none":
        if cls or options or checkpoint or seed is not None:
            raise ValueError("--purifier none takes no purifier class, options, checkpointing or seed")
        return None
    from ..factory import create_purifier, list_purifiers, takes_classifier
    from ..factory import load_purifier as load_saved

    try:
        if _is_entry_point(spec):
            purifier = entry_point(spec)(**options)
        elif spec in list_purifiers():
            shared = {"classifier": classifier} if takes_classifier(spec) and classifier is not None else {}
            purifier = create_purifier(spec, pretrained=True, **shared, **options)
        elif is_saved_purifier(spec):
            shared = {} if classifier is None else {"classifier": copy.deepcopy(classifier),
                                                    "optional": ("classifier",)}
            try:
                purifier = load_saved(spec, **shared, **options)  # config.json names the class
            except RuntimeError as error:  # a strict load: the classifier's keys differ
                if classifier is None or '"classifier.' not in str(error):
                    raise
                raise ValueError(
                    f"{spec}: the saved classifier does not have the architecture given ({str(error).splitlines()[0]} "
                    "...): `purifytf eval` gives nn.Sequential(v2.Normalize(mean, std), classifier) when --normalize "
                    "resolves to a mean and std, the bare classifier with --normalize none") from error
        else:
            raise ValueError(f"unknown purifier {spec!r}: give 'none', a saved directory, a Hub repo id, "
                             f"module:function or one of {list_purifiers()}")
    except TypeError as error:  # an option the purifier does not take, or an argument it needs
        raise ValueError(f"purifier {spec!r}: {error}") from error
    if cls and type(purifier).__name__ != cls:
        raise ValueError(f"{spec!r} holds a {type(purifier).__name__}, not a {cls} (the class is read from the "
                         "purifier, e.g. its config.json: --purifier-class is not needed)")
    if not isinstance(purifier, nn.Module):
        raise ValueError(f"purifier {spec!r} is a {type(purifier).__name__}, not an nn.Module")
    if checkpoint:
        switched = [m for m in purifier.modules() if isinstance(getattr(m, "checkpoint", None), bool)]
        if not switched:
            raise ValueError(f"purifier {type(purifier).__name__} has no gradient checkpointing option")
        for module in switched:
            module.checkpoint = True
    if seed is not None:
        purifier.seed = seed
    return purifier


def unit_input_classifier(classifier: nn.Module, normalize: str,
                          channels: int | None = None) -> tuple[nn.Module, tuple | None]:
    """``classifier`` as a saliency purifier reads it, on [0, 1] images, and the (mean, std) the command line's
    ``normalize`` resolves to (fitted to the classifier's input channels, else ``channels``; ``None``: none):
    ``nn.Sequential(v2.Normalize(mean, std), classifier)`` over the same network, or ``classifier`` itself."""
    normalization = adapt_normalization(resolve_normalization(classifier, parse_normalize(normalize)),
                                        input_channels(classifier) or channels)
    if normalization is None:
        return classifier, None
    return nn.Sequential(v2.Normalize(*normalization), classifier), normalization


def parse_normalize(text: str):
    """The ``normalize`` argument of :class:`~purifytf.DefendedModel` a CLI string stands for."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if ":" in text:
        mean, _, std = text.partition(":")
        try:
            return [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]
        except ValueError:
            raise ValueError(f"normalisation must be MEAN,...:STD,..., got {text!r}") from None
    from torchvision.models import get_weight

    try:
        return get_weight(text)
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"normalisation {text!r}: not auto, none, MEAN,...:STD,... or torchvision weights "
                         "(e.g. ResNet50_Weights.IMAGENET1K_V2)") from None
