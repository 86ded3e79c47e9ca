"""``purifytf purify``: purify PNG/JPEG files or whole folders with any listed purifier.

::

    purifytf purify photo.png cleaned.png                 # one file
    purifytf purify scans/ extra.jpg --out purified/      # files and folders (recursive) into a folder

Outputs keep the inputs' sizes, file names and formats (a folder's sub-folders are kept under
``--out``); no input is ever overwritten, nor an existing output without ``--overwrite`` (images already under
``--out`` are not read as inputs). Images are read as grey or RGB to fit the purifier's
channels: grey images are repeated to RGB, and RGB images whose three channels are equal count as
grey; a colour image for a grey purifier is an error, and so are 32-bit and floating-point images (16-bit
ones are read scaled to 8 bits, and written with 8). The EXIF orientation is applied; an alpha channel is dropped.
Every
input is read and checked before the first output is written. ``--seed`` makes the purification
deterministic (the purifier's ``seed``). A saved saliency purifier needs ``--classifier``, the architecture
of the classifier saved with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import to_8bit
from .evaluation.loading import is_saved_purifier, load_classifier, load_purifier, unit_input_classifier

__all__ = ["DEFAULT_PURIFIER", "IMAGE_SUFFIXES", "add_arguments", "collect_images", "purify_files",
           "read_image", "run"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_PURIFIER = "saliency_diffpure.fashion_mnist"
"""The embedded default: SaliencyDiffPurify on the bundled Fashion-MNIST DDPM (28x28 grey, 10 NFE)."""


def collect_images(inputs: list[Path], out: Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """``(source, destination)`` of every image: files as ``out/NAME``, folders' images (recursively, except those
    under ``out``: earlier outputs) at their path relative to the folder. Refuses destinations that are an input,
    that two inputs share, or that exist (unless ``overwrite``)."""
    pairs = []
    for item in inputs:
        if item.is_dir():
            target, source = out.resolve(), item.resolve()
            inside = target != source and target.is_relative_to(source)  # earlier outputs in a sub-folder
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (inside and p.resolve().is_relative_to(target)))
            if not found:
                raise ValueError(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
            pairs += [(p, out / p.relative_to(item)) for p in found]
        else:
            pairs.append((_image_file(item), out / item.name))
    return _check_destinations(pairs, overwrite)


def _image_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: not a PNG or JPEG file ({', '.join(IMAGE_SUFFIXES)})")
    return path


def _check_destinations(pairs: list[tuple[Path, Path]], overwrite: bool) -> list[tuple[Path, Path]]:
    sources = {p.resolve(): p for p, _ in pairs}
    seen: dict[Path, Path] = {}
    for source, destination in pairs:
        target = destination.resolve()
        if target in sources:
            raise ValueError(f"refusing to overwrite the input {sources[target]}: choose another output")
        if target.exists() and not overwrite:
            raise ValueError(f"{destination} exists: delete it, choose another output, or pass --overwrite")
        if target in seen:
            raise ValueError(f"{seen[target]} and {source} would both be written to {destination}: "
                             "purify them into different output folders")
        seen[target] = source
    return pairs


def read_image(path: Path, channels: int | None) -> Tensor:
    """(C, H, W) float in [0, 1], grey (C = 1) or RGB (C = 3) as ``channels`` needs (``None``: as stored;
    :func:`~purifytf.data.to_8bit`)."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(to_8bit(image), dtype=np.float32) / 255
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    x = torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)
    if channels is None or x.shape[0] == channels:
        return x
    if channels == 3 and x.shape[0] == 1:
        return x.expand(3, -1, -1)
    if channels == 1 and bool((x == x[:1]).all()):
        return x[:1]
    raise ValueError(f"{path}: a colour image, but the purifier takes {channels}-channel images"
                     + (" (grey): convert it to grey first, or pick an RGB purifier" if channels == 1 else ""))


def _write_image(x: Tensor, path: Path) -> None:
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image.save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


@torch.no_grad()
def purify_files(purifier: nn.Module, pairs: list[tuple[Path, Path]], batch_size: int = 16,
                 device: torch.device | str = "cpu", progress: bool = True) -> int:
    """Purify every ``(source, destination)`` pair, ``batch_size`` images of one shape per call. Every image is
    read and checked first (nothing is written if one is refused), then read again batch by batch. Returns the
    number of images written."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    channels = getattr(purifier, "in_channels", None)
    groups: dict[tuple, list[tuple[Path, Path]]] = {}
    for pair in pairs:
        groups.setdefault(tuple(read_image(pair[0], channels).shape), []).append(pair)
    with tqdm(total=len(pairs), desc="purify", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                x = torch.stack([read_image(source, channels) for source, _ in batch])
                for (_, destination), purified in zip(batch, purifier(x.to(device)), strict=True):
                    _write_image(purified, destination)
                bar.update(len(batch))
    return len(pairs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="PNG/JPEG files or folders; or exactly IN OUT (two files) without --out")
    parser.add_argument("--out", type=Path, help="output folder (created); inputs are never overwritten")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never inputs)")
    parser.add_argument("--purifier", default=DEFAULT_PURIFIER,
                        help="a name of `purifytf.factory.list_purifiers()` (pretrained weights; *.fashion_mnist are "
                             f"embedded), a saved directory or a Hub repo id (default {DEFAULT_PURIFIER})")
    parser.add_argument("--classifier", help="a saved saliency purifier's classifier architecture, e.g. "
                        "purifytf:fashion_mnist_cnn or timm:resnet18 (its weights come from the saved folder)")
    parser.add_argument("--num-classes", type=int, help="classes of a timm or torchvision --classifier")
    parser.add_argument("--in-channels", type=int, help="input channels of a timm --classifier (1: grey)")
    parser.add_argument("--normalize", default="none", help="as in `purifytf eval`: the saved classifier is then "
                        "nn.Sequential(v2.Normalize(mean, std), --classifier) (default none: the bare --classifier)")
    parser.add_argument("--seed", type=int, help="deterministic purification with this seed")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _pairs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    if args.out is not None:
        return collect_images(args.inputs, args.out, args.overwrite)
    if len(args.inputs) == 2 and args.inputs[1].suffix.lower() in IMAGE_SUFFIXES:
        source, destination = args.inputs
        if source.is_dir():
            raise ValueError(f"{source} is a folder: give the output folder with --out")
        if destination.exists() and not args.overwrite:  # maybe a second input, not an output
            raise ValueError(f"{destination} exists: to purify both files give --out FOLDER; to replace an "
                             "earlier output, delete it first or pass --overwrite")
        return _check_destinations([(_image_file(source), destination)], args.overwrite)
    raise ValueError("give the output: --out FOLDER, or exactly two files IN OUT")


def _saved_classifier(args: argparse.Namespace) -> nn.Module | None:
    """The architecture of a saved saliency purifier's classifier (random weights: the saved folder holds them)."""
    if args.classifier is None:
        return None
    if not is_saved_purifier(args.purifier):
        raise ValueError(f"--classifier gives a saved purifier's classifier architecture (its weights come from the "
                         f"saved folder); {args.purifier!r} is not a saved purifier")
    classifier = load_classifier(args.classifier, num_classes=args.num_classes, in_channels=args.in_channels,
                                 architecture_only=True)
    return unit_input_classifier(classifier, args.normalize)[0]


def run(args: argparse.Namespace) -> int:
    """Purify the files; prints where they went. Returns the exit status (2: bad arguments or inputs)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        pairs = _pairs(args)
        if args.purifier == "none":
            raise ValueError("--purifier none purifies nothing: give a purifier")
        purifier = load_purifier(args.purifier, seed=args.seed, classifier=_saved_classifier(args)).to(device)
        count = purify_files(purifier, pairs, args.batch_size, device, args.progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"purifytf purify: error: {error}", file=sys.stderr)
        return 2
    target = pairs[0][1] if args.out is None else args.out
    print(f"purified {count} image{'s' * (count != 1)} with {type(purifier).__name__} "
          f"({getattr(purifier, 'last_nfe', 0)} network calls per image) -> {target}")
    return 0
