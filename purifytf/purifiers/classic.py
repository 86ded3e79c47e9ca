"""The classic input-transformation purifiers: JPEG, blur, bit-depth reduction, random resize and pad.

Each is a small functional kernel on a ``(B, C, H, W)`` float batch in [0, 1] plus a thin
:class:`~purifytf.base.Purifier` around it. None calls a network (NFE = 0). The gradient each
gives the attacker is documented per kernel: exact, straight-through or BPDA (Athalye et al. 2018).
"""

import io

import PIL.Image
import torch
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d, median_blur
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ..base import Purifier
from ..functional import straight_through
from ..inputs import check_choice
from ..random import rand_like

__all__ = [
    "BitDepthPurify",
    "BlurPurify",
    "JPEGPurify",
    "RandomResizePadPurify",
    "blur",
    "differentiable_jpeg",
    "jpeg",
    "random_resize_pad",
    "real_jpeg",
    "reduce_bit_depth",
]

JPEG_CODECS = ("differentiable", "real")
BLUR_KINDS = ("gaussian", "median")


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


# --- JPEG --------------------------------------------------------------------------------------
def differentiable_jpeg(x: Tensor, quality: int) -> Tensor:
    """Kornia's differentiable JPEG codec (Reich et al. 2024) on ``(B, C, H, W)`` in [0, 1], ``C`` = 1 or 3.

    Standard quantisation tables scaled by ``quality``, 4:2:0 chroma subsampling; the gradient is
    exact for this codec (rounding is a cubic polynomial around ``round``, clipping is soft). Grey
    images are repeated to RGB, coded, and averaged back to one channel.
    """
    if x.shape[1] == 1:
        return differentiable_jpeg(x.expand(-1, 3, -1, -1), quality).mean(1, keepdim=True)
    return jpeg_codec_differentiable(x, x.new_tensor([float(quality)]))


def real_jpeg(x: Tensor, quality: int) -> Tensor:
    """A real JPEG round trip (Pillow's libjpeg) of ``(B, C, H, W)`` in [0, 1], ``C`` = 1 or 3; no gradient.

    Pixels are rounded to 8 bits and each image is saved as ``Image.save(f, "JPEG", quality=quality)``
    (RGB: 4:2:0; grey: a greyscale JPEG, the same as coding R = G = B) and decoded, on the CPU
    whatever ``x.device``; the result comes back on ``x``'s device and dtype.
    """
    out = []
    for image in x.detach().mul(255).round().to("cpu", torch.uint8):
        buffer = io.BytesIO()
        TF.to_pil_image(image).save(buffer, "JPEG", quality=quality)
        out.append(TF.pil_to_tensor(PIL.Image.open(buffer)))
    return torch.stack(out).to(x.device, x.dtype).div(255)


def jpeg(x: Tensor, quality: int, codec: str = "differentiable") -> Tensor:
    """JPEG compress and decompress ``(B, C, H, W)`` in [0, 1], ``C`` = 1 or 3.

    ``codec="differentiable"``: :func:`differentiable_jpeg`, exact gradient. ``codec="real"``:
    :func:`real_jpeg` in the forward pass with :func:`differentiable_jpeg`'s gradient (BPDA).
    """
    check_choice("codec", codec, JPEG_CODECS)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"JPEG codes 1- or 3-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})")
    if codec == "differentiable":
        return differentiable_jpeg(x, quality)
    out = real_jpeg(x, quality)
    if torch.is_grad_enabled() and x.requires_grad:
        out = straight_through(out, differentiable_jpeg(x, quality))
    return out


class JPEGPurify(Purifier):
    """JPEG compression (Dziugaite et al. 2016; Guo et al. 2018) of RGB or grey images; see :func:`jpeg`.

    Args:
        quality: JPEG quality in [1, 100] (libjpeg scaling of the standard tables).
        codec: ``"differentiable"`` (kornia's differentiable codec, exact gradient) or ``"real"``
            (libjpeg, as Pillow, in the forward pass; the differentiable codec's gradient, i.e. a
            BPDA surrogate for the adaptive attacker).
    """

    def __init__(self, quality: int = 75, codec: str = "differentiable"):
        super().__init__()
        _check_int("quality", quality, 1, 100)
        check_choice("codec", codec, JPEG_CODECS)
        self.quality = quality
        self.codec = codec

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return jpeg(x, self.quality, self.codec)

    def _settings_repr(self) -> str:
        return f"quality={self.quality}, codec={self.codec!r}"


# --- blur --------------------------------------------------------------------------------------
def blur(x: Tensor, kind: str = "gaussian", kernel_size: int = 3, sigma: float = 1.0) -> Tensor:
    """Gaussian or median filter (kornia) of ``(B, C, H, W)``, ``kernel_size`` x ``kernel_size``.

    Borders are reflected, so ``H, W > kernel_size // 2``. ``sigma`` (pixels) is the Gaussian's and
    is ignored by the median. Exact gradient (the median's routes to the selected pixel).
    """
    check_choice("kind", kind, BLUR_KINDS)
    if kind == "median":
        return median_blur(x, kernel_size)
    return gaussian_blur2d(x, kernel_size, (sigma, sigma))


class BlurPurify(Purifier):
    """Gaussian or median filtering (median: Xu et al. 2018's local smoothing), any channel count.

    Args:
        kind: ``"gaussian"`` or ``"median"``.
        kernel_size: odd window side in pixels; images must be larger than ``kernel_size // 2``.
        sigma: Gaussian standard deviation in pixels (ignored by the median).
    """

    def __init__(self, kind: str = "gaussian", kernel_size: int = 3, sigma: float = 1.0):
        super().__init__()
        check_choice("kind", kind, BLUR_KINDS)
        _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.kind = kind
        self.kernel_size = kernel_size
        self.sigma = sigma

    @property
    def min_size(self) -> int:
        return self.kernel_size // 2 + 1

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return blur(x, self.kind, self.kernel_size, self.sigma)

    def _settings_repr(self) -> str:
        sigma = f", sigma={self.sigma}" if self.kind == "gaussian" else ""
        return f"kind={self.kind!r}, kernel_size={self.kernel_size}{sigma}"


# --- bit depth ---------------------------------------------------------------------------------
def reduce_bit_depth(x: Tensor, bits: int) -> Tensor:
    """Round ``x`` in [0, 1] to ``2**bits`` levels ``k / (2**bits - 1)``; straight-through gradient.

    The backward pass is the identity's (the rounding's derivative is zero almost everywhere).
    """
    levels = 2**bits - 1
    return straight_through(torch.round(x * levels) / levels, x)


class BitDepthPurify(Purifier):
    """Bit-depth reduction (Xu et al. 2018's feature squeezing), any channel count.

    Args:
        bits: bits per channel in [1, 8] (8: the 256 levels of uint8 images).
    """

    def __init__(self, bits: int = 4):
        super().__init__()
        _check_int("bits", bits, 1, 8)
        self.bits = bits

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return reduce_bit_depth(x, self.bits)

    def _settings_repr(self) -> str:
        return f"bits={self.bits}"


# --- random resize and pad ---------------------------------------------------------------------
def _randint(u: float, high: int) -> int:
    """Uniform integer in [0, high] from a uniform draw ``u`` in [0, 1)."""
    return min(int(u * (high + 1)), high)


def random_resize_pad(
    x: Tensor, max_scale: float = 1.1, fill: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Xie et al. (2018)'s random resizing and padding of ``(B, C, H, W)``, back to ``H x W``.

    With the padded size ``P = (round(H * max_scale), round(W * max_scale))``, each image
    independently is

    1. resized (bilinear, antialiased) to ``(h, w)``: ``h`` uniform among the integers in
       ``[H, P_H]``, ``w = min(round(W * h / H), P_W)`` (the aspect ratio kept);
    2. padded with ``fill`` to ``P``, at a top and left offset uniform among the integers in
       ``[0, P_H - h]`` and ``[0, P_W - w]``;
    3. resized (bilinear, antialiased) back to ``(H, W)``.

    Three uniform draws per image come from ``generator`` (global RNG if ``None``). For fixed draws
    the map is linear in ``x``; its gradient is exact. ``max_scale = 1`` is the identity.
    (Xie et al.: 299-pixel inputs, ``h`` in [299, 331), padded to 331, i.e. ``max_scale`` 331/299.)
    """
    b, _, height, width = x.shape
    pad_h, pad_w = round(height * max_scale), round(width * max_scale)
    draws = rand_like(x.new_empty(b, 3), generator).tolist()
    out = []
    for image, (u_size, u_top, u_left) in zip(x, draws, strict=True):
        h = height + _randint(u_size, pad_h - height)
        w = min(round(width * h / height), pad_w)
        top, left = _randint(u_top, pad_h - h), _randint(u_left, pad_w - w)
        image = TF.resize(image, [h, w], antialias=True)
        image = TF.pad(image, [left, top, pad_w - w - left, pad_h - h - top], fill=fill)
        out.append(TF.resize(image, [height, width], antialias=True))
    return torch.stack(out)


class RandomResizePadPurify(Purifier):
    """Random resizing and padding (Xie et al. 2018), same output size as input; see :func:`random_resize_pad`.

    Args:
        max_scale: padded size over input size, >= 1 (Xie et al.: 331/299, about 1.107).
        fill: padding value in [0, 1].
        seed: seeds every call (a deterministic defence); ``None``: the global RNG.
    """

    def __init__(self, max_scale: float = 1.1, fill: float = 0.0, seed: int | None = None):
        super().__init__(seed=seed)
        if not max_scale >= 1:
            raise ValueError(f"max_scale must be >= 1, got {max_scale}")
        if not 0 <= fill <= 1:
            raise ValueError(f"fill must be in [0, 1], got {fill}")
        self.max_scale = max_scale
        self.fill = fill

    def _purify(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return random_resize_pad(x, self.max_scale, self.fill, generator)

    def _settings_repr(self) -> str:
        return f"max_scale={self.max_scale}, fill={self.fill}"
