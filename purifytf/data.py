"""Image data sources, shared by training and evaluation: a folder of images, an IDX / NumPy array, or a
torchvision dataset.

Every source is a map-style dataset of ``(image, label)`` pairs: ``image`` a float32
``(C, H, W)`` tensor in [0, 1], ``label`` an int (``-1`` where the source has none). Use
:func:`open_data` to open one from a command-line spec.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = ["ArrayData", "FASHION_MNIST_IDX", "ImageFolderData", "NO_LABEL", "fashion_mnist", "is_grey", "load_array",
           "open_data", "read_idx", "read_npz", "to_8bit", "to_images", "torchvision_dataset"]

NO_LABEL = -1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def to_8bit(image: PIL.Image.Image, grey: bool | None = None) -> PIL.Image.Image:
    """``image`` as 8-bit grey (``"L"``) or RGB, upright (its EXIF orientation applied): as ``grey`` says, or by
    its own mode (:func:`is_grey`) when ``None``.

    16-bit grey is scaled (65535 -> 255), not clipped as ``Image.convert`` does; 32-bit integer and float
    images (modes ``I``, ``F``), whose range the file does not state, raise a ``ValueError``.
    """
    if image.mode in ("I", "F"):
        raise ValueError(f"a {image.mode} image (32-bit integer or floating point), whose range is not known: "
                         "save it with 8 or 16 bits per channel")
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8), "L")
    if grey is None:
        grey = is_grey(image)
    return image.convert("L" if grey else "RGB")


def is_grey(image: PIL.Image.Image) -> bool:
    """Whether ``image``'s mode is grey (bilevel, 8- or 16-bit grey, with or without alpha)."""
    return image.mode in ("1", "L", "LA") or image.mode.startswith("I;16")


def _resize(image_size: int | None) -> list[v2.Transform]:
    """Resize the short side to ``image_size`` and centre-crop a square (nothing for ``None``)."""
    return [] if image_size is None else [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def _image_transform(image_size: int | None) -> v2.Compose:
    """PIL / uint8 / float image -> float (C, H, W) in [0, 1], resized by :func:`_resize`."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *_resize(image_size)])


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format, optionally gzipped)."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim).reshape(shape)
    return array.astype(array.dtype.newbyteorder("="))  # a native-order copy (torch reads no big-endian)


FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def fashion_mnist(root: str | Path = FASHION_MNIST_IDX, split: str = "train") -> ArrayData:
    """The Fashion-MNIST ``split`` (``"train"``: 60,000 images, ``"test"``: 10,000) from the four IDX files in
    ``root``: images (N, 1, 28, 28) in [0, 1], int64 labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    return ArrayData(to_images(read_idx(root / f"{prefix}-images-idx3-ubyte.gz")),
                     read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images (array ``images`` or ``x``, or the only or first positional array ``arr_0``) and the labels
    (``labels`` or ``y``, or the second positional array ``arr_1``; ``None`` when there are none) of an ``.npz``."""
    with np.load(path) as archive:
        keys = archive.files
        if sorted(keys) == ["arr_0", "arr_1"]:  # np.savez(file, images, labels)
            return archive["arr_0"], archive["arr_1"]
        image_key = next((k for k in ("images", "x") if k in keys), keys[0] if len(keys) == 1 else None)
        if image_key is None:
            raise ValueError(f"{path} must hold an array 'images' (or 'x') and may hold 'labels' (or 'y'); "
                             f"it has {sorted(keys)}")
        label_key = next((k for k in ("labels", "y") if k in keys), None)
        return archive[image_key], None if label_key is None else archive[label_key]


def load_array(path: str | Path) -> np.ndarray:
    """An array from ``.npy``, ``.npz`` (its images: :func:`read_npz`) or an IDX file."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".npz":
        return read_npz(path)[0]
    return read_idx(path)


def to_images(array: np.ndarray | Tensor) -> Tensor:
    """(N, H, W), (N, H, W, C) with C in {1, 3} or (N, C, H, W) -> float (N, C, H, W) in [0, 1].

    ``uint16`` arrays are scaled by 1/65535, other integer arrays (values in [0, 255]) by 1/255; float arrays
    must already lie in [0, 1]; boolean arrays are 0 and 1. Values outside these ranges raise a ``ValueError``
    (never a silent rescale).
    """
    array = np.asarray(array)
    top = 1.0 if array.dtype == bool or np.issubdtype(array.dtype, np.floating) else (
        65535 if array.dtype == np.uint16 else 255)
    if top == 1 and not np.isfinite(array).all():
        raise ValueError("float images hold NaN or infinite values")
    if array.size and (array.min() < 0 or array.max() > top):
        kind = "float" if top == 1 else str(array.dtype)
        raise ValueError(f"{kind} images must lie in [0, {top:g}], got values in [{array.min():g}, {array.max():g}]: "
                         "scale floats to [0, 1] or save 8-bit images as uint8")
    images = torch.as_tensor(array.astype(np.float32))
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.dim() != 4:
        raise ValueError(f"expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(images.shape)}")
    return images.div(top).contiguous()


class ArrayData(Dataset):
    """In-memory images (N, C, H, W) in [0, 1] with optional integer labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor | np.ndarray | None = None):
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels)).long()
        if self.labels is not None and len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = NO_LABEL if self.labels is None else int(self.labels[index])
        return self.images[index], label

    @classmethod
    def from_file(cls, path: str | Path, labels: str | Path | None = None) -> ArrayData:
        """Load ``path``; an ``.npz`` brings its own labels (:func:`read_npz`), ``*-images-idx3-*`` files their
        ``*-labels-idx1-*`` sibling; ``labels`` (an array file) overrides both."""
        path = Path(path)
        if labels is not None:
            return cls(to_images(load_array(path)), load_array(labels))
        if path.suffix == ".npz":
            images, own = read_npz(path)
            return cls(to_images(images), own)
        sibling = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
        return cls(to_images(load_array(path)), load_array(sibling) if sibling != path and sibling.exists() else None)


class ImageFolderData(Dataset):
    """Image files under ``root`` (recursive, sorted); labels are the sorted first-level folders.

    Files directly in ``root`` have no label. Every image is read grey if all files are grey, else RGB (a grey file
    among colour ones is repeated to 3 channels). Without ``image_size`` all images must share a size.
    """

    def __init__(self, root: str | Path, image_size: int | None = None):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no image files under {self.root}")
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
        self.grey = all(_file_is_grey(path) for path in self.files)  # one channel count for every image
        self.transform = _image_transform(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        with PIL.Image.open(path) as file:
            try:
                image = to_8bit(file, grey=self.grey)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        label = NO_LABEL if path.parent == self.root else self.classes.index(path.relative_to(self.root).parts[0])
        return self.transform(image), label


def _file_is_grey(path: Path) -> bool:
    """:func:`is_grey` of an image file, from its header."""
    try:
        with PIL.Image.open(path) as file:
            return is_grey(file)
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


def torchvision_dataset(name: str, root: str | Path, train: bool = True, split: str | None = None,
                        image_size: int | None = None) -> Dataset:
    """``torchvision.datasets.NAME`` already in ``root`` (never downloads), as ``(image, label)`` pairs.

    The split is ``split`` (default ``"train"`` or ``"test"`` by ``train``): passed as ``split=``, or as
    ``train=`` (``"train"`` or ``"test"`` only) to datasets that take that. Images go through
    :func:`_image_transform` (``image_size``).
    """
    datasets = importlib.import_module("torchvision.datasets")
    cls = getattr(datasets, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"torchvision.datasets has no dataset {name!r}")
    params = inspect.signature(cls).parameters
    kwargs = {"download": False} if "download" in params else {}
    split = split or ("train" if train else "test")
    if "train" in params:
        if split not in ("train", "test"):
            raise ValueError(f"torchvision.datasets.{name} has a train and a test split, not {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    return _TorchvisionData(cls(str(root), **kwargs), image_size)


class _TorchvisionData(Dataset):
    def __init__(self, dataset: Dataset, image_size: int | None):
        self.dataset = dataset
        self.transform = _image_transform(image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def open_data(spec: str, image_size: int | None = None, labels: str | None = None) -> Dataset:
    """Open a training source of ``(image, label)`` pairs.

    ``spec``: a directory (:class:`ImageFolderData`); a ``.npy`` / ``.npz`` / IDX file
    (:class:`ArrayData`, ``labels`` an optional array file of the same kind); or
    ``torchvision:NAME:ROOT`` (``torchvision.datasets.NAME(ROOT, train=True)``, never downloads).
    ``image_size`` resizes (short side) and centre-crops folder and torchvision images.
    """
    if spec.startswith("torchvision:"):
        _, name, root = (spec.split(":", 2) + [""])[:3]
        return torchvision_dataset(name, root or ".", train=True, image_size=image_size)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderData(path, image_size)
    if path.is_file():
        data = ArrayData.from_file(path, labels)
        if image_size is not None and data.images.shape[-2:] != (image_size, image_size):
            data.images = v2.Compose(_resize(image_size))(data.images)
        return data
    raise FileNotFoundError(f"no training data at {spec!r}")
