"""One classifier loader, shared by ``purifytf eval``, ``purifytf train`` and the factory.

Grammar of ``spec``:

- ``timm:NAME`` (or a bare timm model name): ``timm.create_model(NAME, ...)``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, ...)``;
- ``purifytf:NAME``: a classifier shipped with purifytf (``fashion_mnist_cnn``, bundled weights);
- ``package.module:function``: ``function()``, which returns an ``nn.Module``;

then ``weights`` (a ``.safetensors`` file or a ``torch.save`` state dict) are loaded strictly. The
model comes back in eval mode.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from .checkpoints import load_state_dict_file
from .config import read_config
from .hub import companion_file
from .models.classifiers import SmallCNN

__all__ = ["entry_point", "fashion_mnist_cnn", "load_classifier"]


def fashion_mnist_cnn(pretrained: bool = False, weights: str = "fashion-mnist", **kwargs) -> nn.Module:
    """The embedded default's target classifier: :class:`~purifytf.models.SmallCNN` (0.46M parameters).

    Args:
        pretrained: load the bundled weights (92 %+ clean Fashion-MNIST test accuracy; see MODEL_CARD.md).
        weights: ``"fashion-mnist"`` (the only variant).
        **kwargs: ``SmallCNN`` arguments for an untrained model.
    Input (B, 1, 28, 28) in [0, 1]; output logits (B, 10). Returned in eval mode.
    """
    if not pretrained:
        return SmallCNN(**kwargs).eval()
    folder = companion_file(weights, "classifier")
    model = SmallCNN(**{**read_config(folder), **kwargs})
    return _load_weights(model, folder / "model.safetensors").eval()


_SHIPPED = {"fashion_mnist_cnn": lambda **kw: fashion_mnist_cnn(pretrained=True, **kw)}


def entry_point(spec: str):
    """``"package.module:function"`` -> the function (a clear error when it is missing)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for entry point {spec!r}: {error}") from error
    if not callable(getattr(module, name, None)):
        raise ValueError(f"entry point {spec!r}: {module_name} has no callable {name!r}")
    return getattr(module, name)


def _load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    model.load_state_dict(load_state_dict_file(path), strict=True)
    return model


def load_classifier(spec: str, weights: str | Path | None = None, pretrained: bool = False,
                    num_classes: int | None = None, in_channels: int | None = None,
                    architecture_only: bool = False) -> nn.Module:
    """The classifier ``spec`` names (see the module doc), in eval mode.

    Args:
        spec: ``timm:NAME`` (or a bare timm name), ``torchvision:NAME``, ``purifytf:NAME`` or ``module:function``.
        weights: state dict file (safetensors or ``torch.save``) loaded strictly after construction.
        pretrained: timm's own pretrained weights (needs a download or timm's cache; timm names only).
        num_classes, in_channels: architecture of a timm or torchvision model (its defaults otherwise).
        architecture_only: a timm or torchvision model without weights is wanted (randomly initialised: the caller
            loads its weights, e.g. a saved saliency purifier's classifier); otherwise that is an error.
    """
    source, sep, name = spec.partition(":")
    if not sep:
        source, name = "timm", spec
    architecture = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_channels)) if v is not None}
    if source not in ("timm", "torchvision") and (pretrained or architecture):
        raise ValueError(f"pretrained, num_classes and in_channels apply to timm and torchvision names, "
                         f"not to {spec!r}")
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown classifier {spec!r}: neither a timm model name nor timm:/torchvision:/"
                             f"purifytf:NAME or a module:function entry")
        if weights is None and not pretrained and not architecture_only:
            raise ValueError(f"classifier {spec!r} would have random weights: give its weights file or pretrained")
        model = timm.create_model(name, pretrained=pretrained and weights is None, **architecture)
    elif source == "torchvision":
        from torchvision.models import get_model

        if weights is None and not architecture_only:
            raise ValueError(f"classifier {spec!r} would have random weights: give its weights file")
        if in_channels is not None:
            raise ValueError(f"torchvision classifiers take 3 channels; in_channels={in_channels} for {spec!r}")
        model = get_model(name, weights=None, **architecture)
    elif source == "purifytf":
        if name not in _SHIPPED:
            raise ValueError(f"unknown shipped classifier {spec!r}; shipped: {sorted(_SHIPPED)}")
        model = _SHIPPED[name]()
    else:
        model = entry_point(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"classifier {spec!r} is a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return model.eval()
