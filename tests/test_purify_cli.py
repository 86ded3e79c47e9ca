"""``purifytf purify``: files and folders in, same names and sizes out, never over an input."""

import numpy as np
import pytest
import torch
from PIL import Image

from purifytf import DiffPurify, OracleBackbone
from purifytf.__main__ import main
from purifytf.data import to_8bit
from purifytf.factory import create_purifier
from purifytf.purify import read_image


def _png(path, size=(20, 24), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _pixels(path):
    with Image.open(path) as image:
        return image.mode, image.size, np.asarray(image)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    return [_png(folder / "a.png", seed=1), _png(folder / "sub" / "b.png", seed=2)]


def test_folder_output_is_the_python_api_result(tmp_path, images, capsys):
    out = tmp_path / "out"
    assert main(["purify", str(tmp_path / "in"), "--out", str(out), "--seed", "0", "--device", "cpu"]) == 0
    assert "purified 2 images with SaliencyDiffPurify (10 network calls per image)" in capsys.readouterr().out
    written = [out / "a.png", out / "sub" / "b.png"]
    purifier = create_purifier("saliency_diffpure.fashion_mnist", pretrained=True, seed=0)
    with torch.no_grad():
        expected = purifier(torch.stack([read_image(p, 1) for p in images]))
    for path, x in zip(written, expected, strict=True):
        mode, size, array = _pixels(path)
        assert mode == "L" and size == (20, 24)
        np.testing.assert_array_equal(array, (x[0] * 255).round().byte().numpy())
    assert not np.array_equal(_pixels(written[0])[2], _pixels(images[0])[2])


def test_one_file_in_one_out_jpeg_and_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save("photo.jpg")
    before = (tmp_path / "photo.jpg").read_bytes()
    assert main(["purify", "photo.jpg", "clean.jpg", "--batch-size", "1"]) == 0
    mode, size, _ = _pixels(tmp_path / "clean.jpg")
    assert mode == "L" and size == (40, 30) and (tmp_path / "photo.jpg").read_bytes() == before
    assert "purify: 100%" in capsys.readouterr().err  # the progress bar


def test_never_overwrites_its_inputs(tmp_path, images, capsys):
    before = [p.read_bytes() for p in images]
    assert main(["purify", str(images[0]), "--out", str(images[0].parent), "--no-progress"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main(["purify", str(images[0].parent), "--out", str(images[0].parent), "--no-progress"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err  # a folder into itself
    for second in images:  # IN OUT with an existing OUT: maybe two inputs and a forgotten --out
        assert main(["purify", str(images[0]), str(second), "--no-progress"]) == 2
        assert "exists: to purify both files give --out FOLDER" in capsys.readouterr().err
    assert [p.read_bytes() for p in images] == before


def test_existing_outputs_are_replaced_only_when_asked_and_never_read_as_inputs(tmp_path, images, capsys):
    out = images[0].parent / "purified"  # inside the input folder
    args = ["purify", str(images[0].parent), "--out", str(out), "--no-progress", "--seed", "0"]
    assert main(args) == 0
    first = (out / "a.png").read_bytes()
    (out / "a.png").write_bytes(b"an unrelated file")
    assert main(args) == 2  # the earlier outputs are not inputs, and an existing file is not replaced silently
    assert "a.png exists: delete it, choose another output, or pass --overwrite" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"an unrelated file"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "a.png").read_bytes() == first and not (out / "purified").exists()


def test_the_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(path, exif=exif)
    assert read_image(path, 1).shape == (1, 40, 20)


@pytest.mark.parametrize("args, message", [
    (["missing.png", "--out", "o"], "no such file or folder"),
    (["missing.png", "o.png"], "missing.png: no such file or folder"),
    (["in", "o.png"], "in is a folder: give the output folder with --out"),
    (["a.txt", "--out", "o"], "not a PNG or JPEG"),
    (["in"], "--out FOLDER"),
    (["in", "--out", "o", "--purifier", "resnet"], "unknown purifier 'resnet'"),
    (["in", "--out", "o", "--purifier", "none"], "--purifier none purifies nothing"),
    (["in", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["in", "--out", "o", "--device", "cuda"], "--device cuda: CUDA is not available"),
])
def test_bad_arguments(tmp_path, images, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "a.txt").write_text("not an image")
    assert main(["purify", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_channels_follow_the_purifier(tmp_path, capsys):
    grey, colour = _png(tmp_path / "grey.png"), _png(tmp_path / "colour.png", mode="RGB")
    assert main(["purify", str(colour), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "colour image, but the purifier takes 1-channel images (grey)" in capsys.readouterr().err
    rgb = DiffPurify(OracleBackbone(torch.rand(4, 3, 8, 8)), t_star=0.1, steps=2, sampler="ddim")
    rgb.save_pretrained(tmp_path / "rgb")
    out = tmp_path / "rgb-out"
    assert main(["purify", str(grey), str(colour), "--out", str(out), "--purifier", str(tmp_path / "rgb"),
                 "--no-progress"]) == 0
    assert [_pixels(out / name)[:2] for name in ("grey.png", "colour.png")] == [("RGB", (20, 24))] * 2


def test_every_input_is_checked_before_anything_is_written(tmp_path, capsys):
    """A refused image anywhere (colour for a grey purifier, unreadable) stops the run before it writes."""
    _png(tmp_path / "in" / "a.png")
    bad = {"colour.png": "colour image", "broken.png": "not a readable image"}
    _png(tmp_path / "bad" / "colour.png", mode="RGB")
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    for name, message in bad.items():
        out = tmp_path / f"out-{name}"
        assert main(["purify", str(tmp_path / "in"), str(tmp_path / "bad" / name), "--out", str(out),
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_a_saved_saliency_purifier_takes_its_classifier_architecture(tmp_path, images, capsys):
    create_purifier("saliency_diffpure.fashion_mnist", pretrained=True).save_pretrained(tmp_path / "sdp")
    args = ["purify", str(images[0]), "--out", str(tmp_path / "o"), "--purifier", str(tmp_path / "sdp"), "--seed", "0",
            "--no-progress"]
    assert main(args) == 2
    assert "needs classifier=" in capsys.readouterr().err
    assert main([*args, "--classifier", "purifytf:fashion_mnist_cnn"]) == 0
    expected = _pixels(tmp_path / "o" / "a.png")
    assert main(["purify", str(images[0]), "--out", str(tmp_path / "named"), "--seed", "0", "--no-progress"]) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "named" / "a.png")[2], expected[2])  # the same purifier
    capsys.readouterr()
    assert main(["purify", str(images[0]), "--out", str(tmp_path / "n2"), "--classifier", "timm:test_resnet",
                 "--no-progress"]) == 2  # a named variant would look at a randomly initialised network
    assert "is not a saved purifier" in capsys.readouterr().err


def test_a_saved_saliency_purifier_whose_classifier_normalises(tmp_path, images):
    from torch import nn
    from torchvision.transforms import v2

    from purifytf.classifiers import fashion_mnist_cnn

    reader = nn.Sequential(v2.Normalize([0.5], [0.25]), fashion_mnist_cnn(pretrained=True))
    saved = create_purifier("saliency_diffpure.fashion_mnist", pretrained=True, classifier=reader, seed=0)
    saved.save_pretrained(tmp_path / "sdp")
    args = ["purify", str(images[0]), "--out", str(tmp_path / "o"), "--purifier", str(tmp_path / "sdp"),
            "--classifier", "purifytf:fashion_mnist_cnn", "--seed", "0", "--no-progress"]
    assert main(args) == 2  # the bare architecture does not match what was saved
    assert main([*args, "--normalize", "0.5:0.25"]) == 0
    with torch.no_grad():
        expected = saved(read_image(images[0], 1)[None])[0, 0]
    np.testing.assert_array_equal(_pixels(tmp_path / "o" / "a.png")[2], (expected * 255).round().byte().numpy())


def test_a_saved_saliency_purifier_with_a_timm_classifier(tmp_path, images):
    """A timm architecture needs no weights of its own here: the saved folder holds them."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    saved = create_purifier("saliency_diffpure.fashion_mnist", pretrained=True, classifier=net, seed=0)
    saved.save_pretrained(tmp_path / "sdp")
    assert main(["purify", str(images[0]), "--out", str(tmp_path / "o"), "--purifier", str(tmp_path / "sdp"),
                 "--classifier", "timm:test_resnet", "--num-classes", "10", "--in-channels", "1", "--seed", "0",
                 "--no-progress"]) == 0
    with torch.no_grad():
        expected = saved(read_image(images[0], 1)[None])[0, 0]
    np.testing.assert_array_equal(_pixels(tmp_path / "o" / "a.png")[2], (expected * 255).round().byte().numpy())


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit grey at 255 (a mid-grey becomes white); it is scaled instead."""
    ramp = np.linspace(0, 65535, 20 * 24).reshape(24, 20).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x = read_image(tmp_path / "deep.png", 1)
    assert x.shape == (1, 24, 20) and (x[0] - torch.from_numpy(ramp / 65535.0).float()).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="a F image .* whose range is not known"):
        to_8bit(Image.fromarray(np.full((4, 5), 0.5, np.float32)))


def test_grey_stored_as_rgb_counts_as_grey(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((4, 5, 3), 77, np.uint8)).save(path)
    assert read_image(path, 1).shape == (1, 4, 5) and read_image(path, None).shape == (3, 4, 5)


def test_weights_not_available_offline_is_a_clear_error(tmp_path, images, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["purify", str(images[0]), "--out", str(tmp_path / "o"), "--purifier", "diffpure.ddpm_cifar10"]) == 2
    assert "cannot load weights 'ddpm-cifar10-32'" in capsys.readouterr().err
