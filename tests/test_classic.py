"""The classic input-transformation purifiers: values, gradients, seeding, serialisation."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from kornia.enhance import jpeg_codec_differentiable
from torchvision.transforms import v2

from purifytf import count_nfe
from purifytf.purifiers.classic import (
    BitDepthPurify,
    BlurPurify,
    JPEGPurify,
    RandomResizePadPurify,
    blur,
    differentiable_jpeg,
    jpeg,
    random_resize_pad,
    reduce_bit_depth,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(*shape, seed=0):
    return torch.rand(*shape, generator=gen(seed))


PURIFIERS = [
    lambda: JPEGPurify(quality=30),
    lambda: JPEGPurify(quality=30, codec="real"),
    lambda: BlurPurify(kind="gaussian", kernel_size=5, sigma=0.8),
    lambda: BlurPurify(kind="median"),
    lambda: BitDepthPurify(bits=3),
    lambda: RandomResizePadPurify(max_scale=1.25, fill=0.5, seed=3),
]


def grad_of(fn, x, weights):
    x = x.clone().requires_grad_(True)
    (fn(x) * weights).sum().backward()
    return x.grad


def pil_jpeg(x, quality):
    """Pillow round trip of (C, H, W) in [0, 1], C = 1 (mode L) or 3."""
    array = x.mul(255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    decoded = torch.from_numpy(np.array(PIL.Image.open(buffer)))
    return decoded.reshape(*decoded.shape[:2], -1).permute(2, 0, 1) / 255


@pytest.mark.parametrize("make", PURIFIERS)
def test_contract(make, tmp_path):
    purifier = make()
    x = images(2, 3, 20, 24)
    with count_nfe() as counter:
        out = purifier(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, purifier(x))  # deterministic, or seeded
    assert counter.count == purifier.last_nfe == 0
    assert torch.equal(purifier(x[0]), purifier(x[:1])[0])  # unbatched input
    image, label = v2.Compose([purifier])(x[0], 7)
    assert label == 7 and torch.equal(image, purifier(x[:1])[0])

    purifier.save_pretrained(tmp_path)
    loaded = type(purifier).from_pretrained(tmp_path)
    assert loaded._hub_mixin_config == purifier._hub_mixin_config
    assert repr(loaded) == repr(purifier)
    assert torch.equal(loaded(x), out)


@pytest.mark.parametrize(
    "make",
    [
        lambda: JPEGPurify(quality=0),
        lambda: JPEGPurify(quality=50.0),
        lambda: JPEGPurify(codec="pillow"),
        lambda: BlurPurify(kind="box"),
        lambda: BlurPurify(kernel_size=4),
        lambda: BlurPurify(sigma=0.0),
        lambda: BitDepthPurify(bits=9),
        lambda: RandomResizePadPurify(max_scale=0.9),
        lambda: RandomResizePadPurify(fill=2.0),
    ],
)
def test_invalid_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_input_errors():
    with pytest.raises(ValueError, match="1- or 3-channel"):
        JPEGPurify()(images(1, 2, 8, 8))
    with pytest.raises(ValueError, match="smaller than the 3x3"):
        BlurPurify(kernel_size=5)(images(1, 3, 2, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BitDepthPurify()(images(1, 3, 8, 8) * 255)


# --- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "median"])
def test_blur_gradient_is_exact(kind):
    x = images(1, 2, 4, 5).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: blur(t, kind, 3, 0.7), (x,), fast_mode=True)
    purifier = BlurPurify(kind=kind, kernel_size=3, sigma=0.7)
    x, weights = images(2, 3, 8, 8), images(2, 3, 8, 8, seed=1)
    assert torch.allclose(grad_of(purifier, x, weights), grad_of(lambda t: blur(t, kind, 3, 0.7), x, weights))
    x64 = images(1, 2, 6, 6, seed=2).double().clamp(0.05, 0.95).requires_grad_(True)  # a purifier without weights
    assert torch.autograd.gradcheck(purifier, (x64,), fast_mode=True)  # computes in float64 for float64 input


def test_differentiable_jpeg_is_kornias_codec():
    x, weights = images(2, 3, 16, 16), images(2, 3, 16, 16, seed=1)

    def kornia_jpeg(t):
        return jpeg_codec_differentiable(t, torch.tensor([40.0])).clamp(0, 1)

    purifier = JPEGPurify(quality=40)
    assert torch.equal(purifier(x), kornia_jpeg(x))
    assert torch.equal(grad_of(purifier, x, weights), grad_of(kornia_jpeg, x, weights))


def test_real_jpeg_is_pillow_forward_and_bpda_backward():
    x, weights = images(2, 3, 16, 24), images(2, 3, 16, 24, seed=1)
    out = jpeg(x.requires_grad_(True), 40, "real")
    assert torch.equal(out, torch.stack([pil_jpeg(image, 40) for image in x.detach()]))
    bpda = grad_of(lambda t: jpeg(t, 40, "real"), x.detach(), weights)
    assert torch.equal(bpda, grad_of(lambda t: differentiable_jpeg(t, 40), x.detach(), weights))
    x = images(2, 3, 16, 24)
    purifier, differentiable = JPEGPurify(quality=40, codec="real"), JPEGPurify(quality=40)
    assert torch.equal(purifier(x), torch.stack([pil_jpeg(image, 40) for image in x]))
    assert torch.equal(grad_of(purifier, x, weights), grad_of(differentiable, x, weights))


@pytest.mark.parametrize("codec", ["differentiable", "real"])
def test_grey_jpeg_is_greyscale_jpeg(codec):
    x, weights = images(2, 1, 16, 16), images(2, 1, 16, 16, seed=1)
    purifier = JPEGPurify(quality=50, codec=codec)
    pillow = torch.stack([pil_jpeg(image, 50) for image in x])
    error = (purifier(x) - pillow).abs()
    assert error.max() == 0 if codec == "real" else error.mean() < 0.02  # the codec approximates libjpeg
    rgb = grad_of(lambda t: differentiable_jpeg(t, 50), x.expand(-1, 3, -1, -1), weights.expand(-1, 3, -1, -1) / 3)
    assert torch.allclose(grad_of(purifier, x, weights), rgb.sum(1, keepdim=True), atol=1e-6)


def test_bit_depth_values_and_straight_through_gradient():
    x, weights = images(2, 3, 8, 8), images(2, 3, 8, 8, seed=1)
    out = BitDepthPurify(bits=2)(x)
    assert torch.equal(out * 3, (out * 3).round()) and torch.allclose(out, x, atol=1 / 6 + 1e-6)
    assert torch.equal(grad_of(lambda t: reduce_bit_depth(t, 2), x, weights), weights)


def test_straight_through_gradient_survives_saturated_pixels():
    x, weights = images(2, 3, 8, 8), images(2, 3, 8, 8, seed=1)
    assert torch.equal(grad_of(BitDepthPurify(bits=2), x, weights), weights)


def test_random_resize_pad_gradient_is_exact():
    x = images(2, 2, 6, 7).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: random_resize_pad(t, 1.5, 0.3, gen(4)), (x,), fast_mode=True)


# --- randomness ----------------------------------------------------------------------------------
def test_random_resize_pad_seeding():
    x = images(4, 3, 16, 16)
    purifier = RandomResizePadPurify(max_scale=1.5)
    a = purifier.purify(x, generator=gen(1))
    assert torch.equal(a, purifier.purify(x, generator=gen(1)))
    assert not torch.equal(a, purifier.purify(x, generator=gen(2)))
    assert not torch.equal(a[0], purifier.purify(x[:1].expand(4, -1, -1, -1), generator=gen(1))[1])  # per image
    seeded = RandomResizePadPurify(max_scale=1.5, seed=7)
    assert torch.equal(seeded(x), seeded(x))
    assert not torch.equal(seeded(x), RandomResizePadPurify(max_scale=1.5, seed=8)(x))
    torch.manual_seed(0)
    b = purifier(x)
    torch.manual_seed(0)
    assert torch.equal(b, purifier(x))  # unseeded: the global RNG


def test_random_resize_pad_geometry():
    x = images(2, 3, 10, 12)
    assert torch.equal(RandomResizePadPurify(max_scale=1.0)(x), x)
    # a white image shrinks by h / P in [1/2, 1] per side onto a black canvas: covers 1/4 to all of it
    # (one generator for the batch: a seeded purifier gives identical images identical outputs)
    coverage = RandomResizePadPurify(max_scale=2.0).purify(torch.ones(8, 1, 10, 10), gen()).mean((1, 2, 3))
    assert (coverage >= 0.25 - 1e-6).all() and (coverage < 1).any() and coverage.unique().numel() > 1


@pytest.mark.parametrize("make", PURIFIERS[2:])
@pytest.mark.parametrize("shape", [(1, 9, 9), (2, 4, 9, 9)])
def test_channel_agnostic(make, shape):
    x = images(*shape)
    assert make()(x).shape == x.shape
