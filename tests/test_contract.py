"""The purifier contract, exercised on DiffPurify: shapes, types, pipelines, errors, Hub format."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from purifytf import DiffPurify, OracleBackbone, Purifier


@pytest.fixture
def purifier(references):
    return DiffPurify(OracleBackbone(references), t_star=0.05, steps=2, seed=0)


def test_is_module_transform_and_hub_mixin(purifier):
    from huggingface_hub import PyTorchModelHubMixin

    assert isinstance(purifier, torch.nn.Module)
    assert isinstance(purifier, v2.Transform)
    assert type(purifier).__mro__.index(PyTorchModelHubMixin) < type(purifier).__mro__.index(v2.Transform)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 1, 8, 8), (2, 3, 1, 8, 8)])
def test_shape_dtype_device_preserved(purifier, shape):
    x = torch.rand(shape)
    out = purifier(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(purifier, dtype):
    out = purifier(torch.rand(2, 1, 8, 8).to(dtype))
    assert out.dtype == dtype


def test_tv_tensor_types_and_pipeline_labels(purifier):
    image = tv_tensors.Image(torch.rand(1, 8, 8))
    out = purifier(image)
    assert type(out) is tv_tensors.Image
    pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), purifier])
    pil = PIL.Image.fromarray((torch.rand(8, 8) * 255).byte().numpy(), mode="L")
    img, label = pipeline((pil, 3))
    assert type(img) is tv_tensors.Image and img.shape == (1, 8, 8) and label == 3
    video = tv_tensors.Video(torch.rand(2, 1, 8, 8))
    assert type(purifier(video)) is tv_tensors.Video
    mask = tv_tensors.Mask(torch.ones(8, 8))
    img2, mask2 = purifier(image, mask)
    assert mask2 is mask  # masks are not images


def test_plain_tensor_sample_with_tensor_label(purifier):
    x, y = torch.rand(1, 8, 8), torch.tensor(5)
    out_x, out_y = purifier((x, y))
    assert out_x.shape == x.shape and out_y is y


@pytest.mark.parametrize("pack", [list, tuple, lambda pair: dict(zip(["clean", "adv"], pair, strict=True))])
def test_a_second_plain_image_is_refused_not_passed_through(purifier, pack):
    """torchvision transforms only the first plain tensor of a sample: a second image would leave unpurified."""
    with pytest.raises(ValueError, match="2 plain tensors of 3\\+ dimensions.*tv_tensors.Image"):
        purifier(pack([torch.rand(1, 8, 8), torch.rand(1, 8, 8)]))
    images = pack([tv_tensors.Image(torch.rand(1, 8, 8)), tv_tensors.Image(torch.rand(1, 8, 8))])
    out = purifier(images)
    outs = out.values() if isinstance(out, dict) else out
    assert all(type(o) is tv_tensors.Image for o in outs)
    assert all(not torch.equal(o, i) for o, i in zip(outs, images.values() if isinstance(images, dict) else images,
                                                     strict=True))


def test_sizes_other_than_the_backbone_are_resized_in_and_out(references):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.05, steps=2, seed=0)
    big = torch.nn.functional.interpolate(references, size=(16, 12), mode="nearest")
    out = purifier(big)
    assert out.shape == big.shape
    small_out = purifier(references)
    back = torch.nn.functional.interpolate(small_out, size=(16, 12), mode="bilinear", antialias=True)
    assert torch.allclose(out, back.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: PIL.Image.new("L", (8, 8)), TypeError, r"v2\.ToImage\(\)"),
        (lambda: torch.randint(0, 255, (1, 8, 8), dtype=torch.uint8), TypeError, r"v2\.ToDtype\(torch\.float32"),
        (lambda: torch.ones(1, 8, 8, dtype=torch.bool), TypeError, "ToDtype"),
        (lambda: torch.full((1, 8, 8), float("nan")), ValueError, "NaN"),
        (lambda: torch.full((1, 8, 8), float("inf")), ValueError, "Inf"),
        (lambda: torch.rand(1, 8, 8) * 255, ValueError, r"expected \[0, 1\]"),
        (lambda: torch.rand(1, 8, 8) * 2 - 1, ValueError, "Normalize"),
        (lambda: torch.rand(3, 8, 8), ValueError, "1-channel"),
        (lambda: torch.rand(0, 1, 8, 8), ValueError, "empty"),
        (lambda: torch.rand(8, 8), ValueError, r"\(C, H, W\)"),
        (lambda: [[0.5]], TypeError, "tensor"),
        (lambda: np.random.rand(8, 8, 1).astype(np.float32), TypeError, "NumPy array.*v2.ToImage"),
        (lambda: torch.rand(8, 8, 1), ValueError, r"looks like \(H, W, C\)"),
        (lambda: torch.rand(3, 8, 8), ValueError, r"v2\.Grayscale\(\)"),
    ],
)
def test_bad_inputs_get_clear_errors(purifier, make, error, match):
    with pytest.raises(error, match=match):
        purifier.purify(make())


def test_pil_and_numpy_errors_through_the_transform_call(purifier):
    """Non-tensor images are refused, never passed through unpurified; labels and 1-d arrays pass through."""
    with pytest.raises(TypeError, match="ToImage"):
        purifier(PIL.Image.new("L", (8, 8)))
    for array in (np.random.rand(1, 8, 8).astype(np.float32), np.zeros((8, 8), np.uint8)):
        with pytest.raises(TypeError, match="NumPy array"):
            purifier(array)
        with pytest.raises(TypeError, match="NumPy array"):
            v2.Compose([purifier])(array, 3)
    image, label, one_hot = purifier(torch.rand(1, 8, 8), 3, np.eye(4)[1])
    assert image.shape == (1, 8, 8) and label == 3 and one_hot.tolist() == [0, 1, 0, 0]


def test_too_small_image(references):
    from purifytf.diffusion import DiffusersUNet

    assert OracleBackbone(references).min_size == 1
    unet = DiffusersUNet.from_config({"unet": _TINY_UNET})
    purifier = DiffPurify(unet, steps=1, seed=0)
    with pytest.raises(ValueError, match="smaller than"):
        purifier(torch.rand(1, 1, 1, 3))


def test_tiny_rounding_outside_range_is_clamped(purifier):
    x = torch.rand(1, 8, 8)
    x[0, 0, 0] = 1.0005
    x[0, 0, 1] = -0.0005
    out = purifier(x)
    assert out.max() <= 1 and out.min() >= 0


def test_hub_round_trip(purifier, tmp_path, references):
    x = torch.rand(2, 1, 8, 8)
    purifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone"]["_class_name"] == "OracleBackbone" and config["t_star"] == 0.05
    assert config["_class_name"] == "DiffPurify"
    assert (tmp_path / "model.safetensors").is_file()
    card = (tmp_path / "README.md").read_text()
    assert "library_name: purifytf" in card and "adversarial-purification" in card
    loaded = DiffPurify.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), purifier(x))
    assert torch.equal(loaded.backbone.references, purifier.backbone.references)


def test_strict_loading_refuses_mismatched_weights(purifier, tmp_path):
    from safetensors.torch import load_file, save_file

    purifier.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="extra"):
        DiffPurify.from_pretrained(tmp_path)


def test_corrupt_weights_file_names_the_file(purifier, tmp_path):
    purifier.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt or truncated"):
        DiffPurify.from_pretrained(tmp_path)


def test_diffusers_backbone_round_trip(tmp_path):
    from purifytf.diffusion import DiffusersUNet

    backbone = DiffusersUNet.from_config({"unet": _TINY_UNET})
    purifier = DiffPurify(backbone, t_star=0.02, steps=2, seed=0)
    x = torch.rand(1, 1, 8, 8)
    out = purifier(x)
    assert out.shape == x.shape and purifier.last_nfe == 2
    purifier.save_pretrained(tmp_path)
    loaded = DiffPurify.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), out)


def test_diffusers_config_builds_the_hub_checkpoint_layout(formats_dir):
    """google/ddpm-cifar10-32: our adapter's config builds exactly the published state_dict."""
    from purifytf.diffusion import DiffusersUNet

    manifest = json.loads((formats_dir / "diffusers_ddpm_cifar10_32.json").read_text())
    with torch.device("meta"):
        backbone = DiffusersUNet.from_config({"unet": manifest["config"]})
    got = {k: list(v.shape) for k, v in backbone.unet.state_dict().items()}
    assert list(got) == list(manifest["state_dict"]) and got == manifest["state_dict"]
    assert backbone.in_channels == 3 and backbone.sample_size == (32, 32)
    fake = {k: torch.empty(s, device="meta") for k, s in manifest["state_dict"].items()}
    backbone.unet.load_state_dict(fake, strict=True, assign=True)


def test_every_purifier_is_registered():
    from purifytf.config import config_class

    assert config_class("DiffPurify") is DiffPurify
    assert issubclass(DiffPurify, Purifier)
    with pytest.raises(ValueError, match="unknown class"):
        config_class("Nope")


_TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}
