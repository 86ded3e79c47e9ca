"""Evaluation datasets: every item is ``(image (C, H, W) float32 in [0, 1], label int)``.

:func:`load_dataset` takes a ``KIND:ARGUMENT`` spec:

- ``npz:FILE.npz``: NumPy arrays ``images`` (or ``x``) and ``labels`` (or ``y``); images
  (N, H, W), (N, H, W, C) or (N, C, H, W), integer (0-255) or float in [0, 1].
- ``idx:IMAGES,LABELS``: MNIST-style IDX files (optionally ``.gz``).
- ``folder:DIR``: one sub-folder of images per class (labels: the sorted folder names).
- ``torchvision:NAME:ROOT[:SPLIT]``: ``torchvision.datasets.NAME`` already in ROOT, nothing is
  downloaded: ``train=False``, or ``split=SPLIT`` (default ``test``; ImageNet: ``val``).
- ``bundled:NAME``: a dataset shipped with purifytf (:data:`BUNDLED`): ``bundled:fashion-mnist`` is the
  first 1,000 Fashion-MNIST test images (MIT licence, Zalando Research).

``size`` (folders and torchvision datasets) resizes the shorter side and centre-crops to a square.
Arrays and folders are read with :mod:`purifytf.data`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ..data import ArrayData, ImageFolderData, read_idx, read_npz, to_images, torchvision_dataset

__all__ = ["BUNDLED", "load_dataset"]

def _fashion_mnist_slice() -> ArrayData:
    from ..hub import companion_file

    return _load_npz(str(companion_file("fashion-mnist", "test_slice")))


BUNDLED: dict[str, Callable[[], Dataset]] = {"fashion-mnist": _fashion_mnist_slice}
"""Datasets shipped with purifytf: name -> function returning the evaluation split."""


def _load_npz(path: str) -> ArrayData:
    images, labels = read_npz(path)
    if labels is None:
        raise ValueError(f"{path} holds no labels: evaluation needs an array 'labels' (or 'y') beside the images")
    return ArrayData(to_images(images), labels)


def _load_idx(argument: str) -> ArrayData:
    images, sep, labels = argument.partition(",")
    if not sep:
        raise ValueError(f"idx datasets are 'idx:IMAGES_FILE,LABELS_FILE', got 'idx:{argument}'")
    return ArrayData(to_images(read_idx(images)), read_idx(labels))


def _load_torchvision(argument: str, size: int | None) -> Dataset:
    name, sep, root = argument.partition(":")
    root, _, split = root.partition(":")
    if not sep:
        raise ValueError(f"torchvision datasets are 'torchvision:NAME:ROOT[:SPLIT]' with NAME in "
                         f"torchvision.datasets, got 'torchvision:{argument}'")
    return torchvision_dataset(name, root, train=False, split=split or None, image_size=size)


def load_dataset(spec: str, size: int | None = None) -> Dataset:
    """The dataset a ``KIND:ARGUMENT`` spec names (see the module doc)."""
    kind, sep, argument = spec.partition(":")
    if not sep or not argument:
        raise ValueError(f"dataset spec must be KIND:ARGUMENT with KIND in npz, idx, folder, torchvision, bundled; "
                         f"got {spec!r}")
    if kind == "bundled":
        if argument not in BUNDLED:
            raise ValueError(f"no bundled dataset {argument!r}; bundled: {sorted(BUNDLED)}")
        return BUNDLED[argument]()
    if kind in ("npz", "idx", "folder") and not all(Path(p).exists() for p in argument.split(",")):
        raise FileNotFoundError(f"dataset {spec!r}: no such file or directory")
    loaders = {"npz": lambda: _load_npz(argument), "idx": lambda: _load_idx(argument),
               "folder": lambda: ImageFolderData(argument, size),
               "torchvision": lambda: _load_torchvision(argument, size)}
    if kind not in loaders:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; known: {sorted([*loaders, 'bundled'])}")
    return loaders[kind]()
