"""Building purifiers, classifiers and normalisations from the command line's strings.

- Purifier: ``none``; a saved directory or Hub repo id with its class (``DiffPurify``) given
  separately, loaded with ``purifier_class(cls).from_pretrained(path, **options)``; or a Python
  entry ``module:function`` called as ``function(**options)``.
- Classifier: a timm model name (weights from a ``.safetensors`` file, or timm's pretrained
  weights) or a Python entry ``module:function`` (optionally with ``.safetensors`` weights).
- Normalisation: ``auto`` (timm's ``pretrained_cfg``), ``none``, a torchvision weights name
  (``ResNet50_Weights.IMAGENET1K_V2``) or ``MEAN,...:STD,...``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from torch import nn

__all__ = ["load_classifier", "load_purifier", "parse_normalize", "parse_options"]


def _entry_point(spec: str):
    """``"package.module:function"`` -> the function."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for entry point {spec!r}: {error}") from error
    if not callable(getattr(module, name, None)):
        raise ValueError(f"entry point {spec!r}: {module_name} has no callable {name!r}")
    return getattr(module, name)


def _is_entry_point(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


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
                  seed: int | None = None) -> nn.Module | None:
    """The purifier ``spec`` names (``None`` for ``"none"``); see the module doc.

    ``checkpoint`` switches on gradient checkpointing in every part that has it (also purifiers
    wrapped by others); ``seed`` makes the purifier deterministic (``Purifier.seed``).
    """
    options = options or {}
    if spec == "none":
        if cls or options or checkpoint or seed is not None:
            raise ValueError("--purifier none takes no purifier class, options, checkpointing or seed")
        return None
    if _is_entry_point(spec):
        purifier = _entry_point(spec)(**options)
    else:
        if not cls:
            raise ValueError(f"loading purifier {spec!r} needs its class, e.g. --purifier-class DiffPurify "
                             "(config.json does not name it)")
        from ..factory import load_purifier as load_saved

        purifier = load_saved(spec, **options)  # config.json names the class
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


def load_classifier(spec: str, weights: str | None = None, pretrained: bool = False,
                    num_classes: int | None = None) -> nn.Module:
    """The classifier ``spec`` names, in eval mode; see the module doc."""
    if _is_entry_point(spec):
        if pretrained or num_classes is not None:
            raise ValueError("--pretrained and --num-classes apply to timm model names, not to entry points")
        model = _entry_point(spec)()
        if not isinstance(model, nn.Module):
            raise ValueError(f"classifier entry point {spec!r} returned a {type(model).__name__}, not an nn.Module")
    else:
        import timm

        if not timm.is_model(spec):
            raise ValueError(f"unknown classifier {spec!r}: neither a timm model name nor a module:function entry")
        if weights is None and not pretrained:
            raise ValueError(f"classifier {spec!r} would have random weights: give --classifier-weights FILE "
                             "or --pretrained")
        model = timm.create_model(spec, pretrained=pretrained and weights is None,
                                  **({} if num_classes is None else {"num_classes": num_classes}))
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    return model.eval()


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
