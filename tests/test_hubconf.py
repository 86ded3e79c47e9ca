"""torch.hub entry points, loaded from the repository with source='local' and a local Hub cache, offline."""

import importlib.util
from pathlib import Path

import pytest
import torch
from test_hub import offline_cache, registry, tiny_hf_weights  # noqa: F401  (fixtures)
from torch import nn

from purifytf import hub
from purifytf.purifiers.diffpure import DiffPurify

REPO = str(Path(__file__).resolve().parents[1])
ENTRIES = {"diff_purify", "saliency_diff_purify", "ssni_purify", "im_purify", "fashion_mnist_cnn"}


def load(name, **kwargs):
    return torch.hub.load(REPO, name, source="local", trust_repo=True, **kwargs)


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_list_and_help():
    """What ``torch.hub.list``/``help`` show (this torch's versions of them take GitHub repos only)."""
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for dep in hubconf.dependencies:
        assert importlib.util.find_spec(dep) is not None
    entries = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")]
    assert set(entries) == ENTRIES
    for name in ENTRIES:
        doc = getattr(hubconf, name).__doc__
        assert "pretrained" in doc and "weights" in doc


def test_diff_purify_pretrained_from_offline_cache(tiny_hf_weights):  # noqa: F811
    purifier = load("diff_purify", pretrained=True, weights="tiny-ddpm", steps=2, seed=0)
    assert isinstance(purifier, DiffPurify) and purifier.t_star == 0.05  # the variant's paper setting
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(purifier.backbone(x, torch.tensor([4])), tiny_hf_weights(x, torch.tensor([4])))
    assert purifier(x).shape == x.shape
    assert load("diff_purify", pretrained=True, weights="tiny-ddpm", t_star=0.3).t_star == 0.3


def test_diff_purify_real_weights_offline_without_cache(offline_cache):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="google/ddpm-cifar10-32"):
        load("diff_purify", pretrained=True, weights="ddpm-cifar10-32")


def test_diff_purify_untrained(tiny_hf_weights):  # noqa: F811
    purifier = load("diff_purify", pretrained=False, weights="tiny-ddpm")
    assert purifier.backbone.config == hub.untrained_backbone("tiny-ddpm").config
    with pytest.raises(KeyError, match="unknown weights"):
        load("diff_purify", weights="nope")


@pytest.mark.parametrize("name", ["im_purify", "fashion_mnist_cnn"])
def test_entries_without_such_weights(name):
    with pytest.raises(KeyError, match="no bundled"):
        load(name, pretrained=True, weights="ddpm-cifar10-32")


def test_saliency_diff_purify_untrained(tiny_hf_weights):  # noqa: F811
    purifier = load("saliency_diff_purify", weights="tiny-ddpm", classifier=tiny_cnn())
    assert purifier.backbone.config == hub.untrained_backbone("tiny-ddpm").config


def test_ssni_purify_untrained(tiny_hf_weights):  # noqa: F811
    purifier = load("ssni_purify", weights="tiny-ddpm")
    assert isinstance(purifier.base, DiffPurify)
    base = load("diff_purify", pretrained=True, weights="tiny-ddpm")
    assert load("ssni_purify", base=base).base is base


def test_im_purify_untrained():
    overrides = {"embed_dim": 32, "depth": 2, "num_heads": 2, "fuse_indices": [0], "decoder_dim": 32,
                 "decoder_depth": 1, "decoder_heads": 2}
    purifier = load("im_purify", overrides=overrides)
    assert type(purifier).__name__ == "IMPurify"


def test_saliency_diff_purify_needs_a_classifier_off_the_embedded_default(tiny_hf_weights):  # noqa: F811
    with pytest.raises(TypeError, match="needs classifier="):
        load("saliency_diff_purify", weights="tiny-ddpm")
