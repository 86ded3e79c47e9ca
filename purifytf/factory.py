"""Named purifier variants, as timm names models: list them, create one, load a saved one.

A name is ``METHOD.BACKBONE`` for diffusion-based purifiers (``diffpure.fashion_mnist``,
``ssni_saliency_diffpure.ddpm_cifar10``, ...), ``impure.fashion_mnist``, or a classic defence
(``jpeg``, ``blur``, ``bit_depth``, ``random_resize_pad``). ``BACKBONE`` is a tag of
:data:`BACKBONES` (registered weights of :mod:`purifytf.hub`); ``fashion_mnist`` is the embedded
default shipped in the package (works offline). A variant's settings are those its weights pair with the method
(:attr:`purifytf.hub.Weights.purifier_settings`: the papers' for published weights, ``purifiers.json`` for the
embedded default).

>>> purifier = create_purifier("ssni_diffpure.fashion_mnist", pretrained=True, steps=10, seed=0)
>>> purifier.save_pretrained("runs/ssni")
>>> same = load_purifier("runs/ssni")                      # doctest: +SKIP

:data:`DEFENCES` / :func:`default_defences` is the one table of defences that the demo, the
benchmarks and the web app use.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from .base import Purifier
from .classifiers import fashion_mnist_cnn
from .config import read_config
from .diffusion.backbones import Backbone
from .hub import companion_file, get_weights, load_backbone, model_card, untrained_backbone
from .purifiers.classic import BitDepthPurify, BlurPurify, JPEGPurify, RandomResizePadPurify
from .purifiers.diffpure import DiffPurify
from .purifiers.impure import IMPurify
from .purifiers.saliency_diffpure import SaliencyDiffPurify
from .purifiers.ssni import SSNIPurify

__all__ = ["BACKBONES", "DEFENCES", "create_purifier", "default_defences", "list_purifiers", "load_purifier",
           "takes_classifier"]

BACKBONES: dict[str, str] = {
    "fashion_mnist": "fashion-mnist",
    "ddpm_cifar10": "ddpm-cifar10-32",
    "score_sde_cifar10": "score-sde-cifar10-ddpmpp-deep-continuous",
    "guided_imagenet256": "guided-diffusion-256-uncond",
}
"""Backbone tag of a variant name -> registered weights (:func:`purifytf.hub.get_weights`)."""

Builder = Callable[..., Purifier]
_VARIANTS: dict[str, Builder] = {}


def list_purifiers(pattern: str | None = None) -> list[str]:
    """Names of the registered variants, sorted; ``pattern``: a shell wildcard (``"*fashion_mnist"``)."""
    return sorted(fnmatch.filter(_VARIANTS, pattern or "*"))


def create_purifier(name: str, pretrained: bool = False, **overrides: Any) -> Purifier:
    """Build the variant ``name``.

    Args:
        name: a name of :func:`list_purifiers`.
        pretrained: load the variant's weights (bundled, or downloaded once and cached; offline with
            ``HF_HUB_OFFLINE=1`` from the cache only) and, where bundled, SSNI's calibration statistics.
            ``False``: randomly initialised networks, SSNI uncalibrated.
        **overrides: constructor arguments replacing the variant's settings. For SSNI variants, the
            arguments ``SSNIPurify`` does not take go to its base purifier (``steps=10``), or ``base=``
            replaces that purifier. Diffusion variants also take ``backbone=`` (a
            :class:`~purifytf.diffusion.Backbone` used instead of the variant's), saliency variants
            ``classifier=`` (default: the bundled classifier where one is bundled).

    Besides the listed names, ``METHOD.WEIGHTS`` builds a diffusion method on any registered weights.
    """
    return _builder_of(name)(pretrained, **overrides)


def _builder_of(name: str) -> Builder:
    if name in _VARIANTS:
        return _VARIANTS[name]
    method, _, weights = name.partition(".")
    if method in _METHODS and weights:  # any registered weights, e.g. "diffpure.fashion-mnist"
        return _with_card(get_weights(weights).name, _METHODS[method](weights))
    raise ValueError(f"unknown purifier {name!r}; known: {list_purifiers()} (or METHOD.WEIGHTS with METHOD one of "
                     f"{sorted(_METHODS)} and WEIGHTS a name of purifytf.hub.list_weights())")


def load_purifier(dir_or_repo_id: str | Path, **kwargs: Any) -> Purifier:
    """Rebuild a saved purifier of any class from a folder or Hub repo id (``config.json`` names the class).

    ``kwargs``: what is not saved (``classifier=`` reaches a saliency purifier wherever it is nested),
    setting overrides, or ``from_pretrained`` options (``map_location``, ``revision``, ``local_files_only``).
    """
    return Purifier.from_pretrained(dir_or_repo_id, **kwargs)


# --- the variants ----------------------------------------------------------------------------------

def _register(name: str, builder: Builder) -> None:
    if name in _VARIANTS:
        raise ValueError(f"purifier variant {name!r} is already registered")
    _VARIANTS[name] = builder


def _carded(purifier: Purifier, weights: str) -> Purifier:
    """``purifier`` with the Hub card metadata of ``weights`` (what ``save_pretrained`` writes)."""
    model_card(purifier, weights, metrics=["accuracy"])
    return purifier


def _backbone(weights: str, pretrained: bool, backbone: Backbone | None) -> Backbone:
    if backbone is not None:
        return backbone
    return load_backbone(weights) if pretrained else untrained_backbone(weights)


def _classifier(weights: str, pretrained: bool, classifier: nn.Module | None) -> nn.Module:
    if classifier is not None:
        return classifier
    if "classifier" not in get_weights(weights).companions:
        raise TypeError(f"a saliency purifier on {weights!r} needs classifier=<the model to defend>")
    return fashion_mnist_cnn(pretrained=pretrained, weights=weights)


def _paired(weights: str, method: str) -> dict[str, Any]:
    """The settings ``weights`` pair with ``method`` (:attr:`purifytf.hub.Weights.purifier_settings`)."""
    return dict(get_weights(weights).purifier_settings.get(method, {}))


def _diffpure(weights: str) -> Builder:
    def build(pretrained: bool, backbone: Backbone | None = None, **kw) -> DiffPurify:
        settings = {**_paired(weights, "diffpure"), **kw}
        return DiffPurify(_backbone(weights, pretrained, backbone), **settings)
    return build


def _saliency(weights: str) -> Builder:
    def build(pretrained: bool, backbone: Backbone | None = None, classifier: nn.Module | None = None,
              **kw) -> SaliencyDiffPurify:
        settings = {**_paired(weights, "saliency_diffpure"), **kw}
        return SaliencyDiffPurify(_backbone(weights, pretrained, backbone),
                                  _classifier(weights, pretrained, classifier), **settings)
    return build


def _ssni(weights: str, base: Builder) -> Builder:
    own = set(SSNIPurify._settings()) - {"base"}

    def build(pretrained: bool, **kw) -> SSNIPurify:
        ssni_kw = {**_paired(weights, "ssni"),
                   **{k: kw.pop(k) for k in list(kw) if k in own}}
        if pretrained and "stats" not in ssni_kw and "ssni_stats" in get_weights(weights).companions:
            saved = json.loads(companion_file(weights, "ssni_stats").read_text())
            ssni_kw = {"eps_steps": saved["eps_steps"], "stats": saved, **ssni_kw}
        given = kw.pop("base", None)
        if given is not None and kw:
            raise TypeError(f"SSNIPurify takes no {sorted(kw)}; settings of base= belong to it")
        return SSNIPurify(given if given is not None else base(pretrained, **kw), **ssni_kw)
    return build


def _impure(weights: str) -> Builder:
    def build(pretrained: bool, **kw) -> IMPurify:
        if not pretrained:  # the bundled network's channels where there is one, else the class default
            bundled = "impure" in get_weights(weights).companions
            channels = {"in_channels": read_config(companion_file(weights, "impure"))["in_channels"]} if bundled else {}
            return IMPurify(**{**channels, **kw})
        return IMPurify.from_pretrained(companion_file(weights, "impure"), **kw)
    return build


def _with_card(weights: str, builder: Builder) -> Builder:
    return lambda pretrained, **kw: _carded(builder(pretrained, **kw), weights)


_METHODS: dict[str, Callable[[str], Builder]] = {
    "diffpure": _diffpure,
    "saliency_diffpure": _saliency,
    "ssni_diffpure": lambda weights: _ssni(weights, _diffpure(weights)),
    "ssni_saliency_diffpure": lambda weights: _ssni(weights, _saliency(weights)),
    "impure": _impure,
}
"""Methods by name: ``METHOD.WEIGHTS`` builds one on any registered weights (``list_purifiers`` lists those
with published weights)."""
_DIFFUSION = ("diffpure", "saliency_diffpure", "ssni_diffpure", "ssni_saliency_diffpure")

for _tag, _weights in BACKBONES.items():
    for _method in _DIFFUSION:
        _register(f"{_method}.{_tag}", _with_card(_weights, _METHODS[_method](_weights)))
_register("impure.fashion_mnist", _with_card("fashion-mnist", _impure("fashion-mnist")))
for _name, _cls in {"jpeg": JPEGPurify, "blur": BlurPurify, "bit_depth": BitDepthPurify,
                    "random_resize_pad": RandomResizePadPurify}.items():
    _register(_name, lambda pretrained, _cls=_cls, **kw: _cls(**kw))


# --- the table of defences -------------------------------------------------------------------------

def defence_table(diffpure_steps: int = 10) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Table name -> (variant name, overrides) of every defence the demo and the benchmarks run, on the
    embedded Fashion-MNIST default (``None``: no defence). ``diffpure_steps``: reverse steps of the fast
    DiffPurify (and of SSNI's base)."""
    fast = {"steps": diffpure_steps}
    return {
        "no defence": (None, {}),
        f"DiffPurify (t*=0.1, {diffpure_steps} steps)": ("diffpure.fashion_mnist", fast),
        "DiffPurify ref (t*=0.1, 100 steps)": ("diffpure.fashion_mnist", {}),
        "SaliencyDiffPurify": ("saliency_diffpure.fashion_mnist", {}),
        "SaliencyDiffPurify ref (spacing 2)": ("saliency_diffpure.fashion_mnist", {"spacing": 2}),
        "SaliencyDiffPurify (spacing 5)": ("saliency_diffpure.fashion_mnist", {"spacing": 5}),
        "SaliencyDiffPurify (spacing 10)": ("saliency_diffpure.fashion_mnist", {"spacing": 10}),
        "SSNIPurify (on DiffPurify)": ("ssni_diffpure.fashion_mnist", fast),
        "SSNIPurify (on DiffPurify ref)": ("ssni_diffpure.fashion_mnist", {}),
        "IMPurify": ("impure.fashion_mnist", {}),
        "JPEGPurify (q=75)": ("jpeg", {"quality": 75}),
        "BlurPurify (Gaussian)": ("blur", {}),
    }


def selects(key: str, name: str) -> bool:
    """Whether a command line's ``key`` picks the defence ``name`` of :func:`defence_table`: an exact table name
    picks only that defence, other text every name containing it."""
    return name == key if key in defence_table() else key in name


DEFENCES: tuple[str, ...] = ("no defence", "DiffPurify (t*=0.1, 10 steps)", "SaliencyDiffPurify",
                             "SSNIPurify (on DiffPurify)", "IMPurify", "JPEGPurify (q=75)", "BlurPurify (Gaussian)")
"""The demo's defences (names of :func:`defence_table` at ``diffpure_steps=10``)."""


def takes_classifier(variant: str | None) -> bool:
    """Whether the variant ``METHOD.WEIGHTS`` looks at a classifier (saliency methods: ``classifier=``)."""
    return variant is not None and variant.split(".")[0] in ("saliency_diffpure", "ssni_saliency_diffpure")


def default_defences(names: Iterable[str] | None = None, *, classifier: nn.Module | None = None,
                     diffpure_steps: int = 10, pretrained: bool = True, **overrides: Any
                     ) -> dict[str, Purifier | None]:
    """Build defences of :func:`defence_table` by table name (``None``: no defence), in table order.

    Args:
        names: table names (default: :data:`DEFENCES`, the demo's, with ``diffpure_steps`` in the DiffPurify name).
        classifier: the classifier saliency purifiers look at (default: the bundled one).
        diffpure_steps: see :func:`defence_table`.
        pretrained: load the bundled weights.
        **overrides: given to every diffusion variant (e.g. ``backbone=``, ``checkpoint=True``, ``seed=0``).
    """
    table = defence_table(diffpure_steps)
    default = [n.replace("10 steps", f"{diffpure_steps} steps") for n in DEFENCES]
    chosen = list(default if names is None else names)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise ValueError(f"unknown defences {unknown}; known: {list(table)}")
    built = {}
    for name in (n for n in table if n in chosen):
        variant, settings = table[name]
        if variant is None:
            built[name] = None
            continue
        extra = dict(overrides) if variant.split(".")[0] in _DIFFUSION else {}
        if takes_classifier(variant) and classifier is not None:
            extra["classifier"] = classifier
        built[name] = create_purifier(variant, pretrained=pretrained, **settings, **extra)
    return built

