"""The factory, the loader and the one configuration system: named variants, config.json, live settings, max_t."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import purifytf
from purifytf import (
    DiffPurify,
    IMPurify,
    OracleBackbone,
    Purifier,
    SaliencyDiffPurify,
    SSNIPurify,
    create_purifier,
    list_purifiers,
    load_purifier,
)
from purifytf.diffusion import Backbone
from purifytf.factory import DEFENCES, default_defences, defence_table
from purifytf.hub import ASSETS

BUNDLED = {"diffpure.fashion_mnist": DiffPurify, "saliency_diffpure.fashion_mnist": SaliencyDiffPurify,
           "ssni_diffpure.fashion_mnist": SSNIPurify, "ssni_saliency_diffpure.fashion_mnist": SSNIPurify,
           "impure.fashion_mnist": IMPurify, "jpeg": purifytf.JPEGPurify, "blur": purifytf.BlurPurify,
           "bit_depth": purifytf.BitDepthPurify, "random_resize_pad": purifytf.RandomResizePadPurify}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_list_purifiers():
    names = list_purifiers()
    assert set(BUNDLED) <= set(names) and names == sorted(names)
    assert {"diffpure.ddpm_cifar10", "ssni_saliency_diffpure.guided_imagenet256"} <= set(names)
    assert list_purifiers("*fashion_mnist") == sorted(n for n in BUNDLED if n.endswith("fashion_mnist"))
    with pytest.raises(ValueError, match="unknown purifier"):
        create_purifier("nope")


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_name_builds_offline_with_pretrained_weights(name, offline):
    purifier = create_purifier(name, pretrained=True)
    assert type(purifier) is BUNDLED[name]
    if name.startswith("ssni"):
        assert purifier.stats is not None  # calibrated by the bundled statistics
        assert type(purifier.base) is (SaliencyDiffPurify if "saliency" in name else DiffPurify)
    x = torch.rand(2, 1, 28, 28)
    if name in ("diffpure.fashion_mnist", "ssni_diffpure.fashion_mnist"):
        purifier = create_purifier(name, pretrained=True, steps=2, seed=0)
    with torch.no_grad():
        assert purifier(x).shape == x.shape


def test_overrides_reach_the_right_part(offline):
    ssni = create_purifier("ssni_diffpure.fashion_mnist", pretrained=True, steps=3, tau=2.0, seed=1)
    assert ssni.base.steps == 3 and ssni.tau == 2.0 and ssni.seed == 1 and ssni.eps_steps == 20
    with pytest.raises(TypeError, match="tau"):
        create_purifier("diffpure.fashion_mnist", tau=2.0)
    with pytest.raises(TypeError, match="needs classifier="):
        create_purifier("saliency_diffpure.ddpm_cifar10")


def test_untrained_variant_of_a_downloadable_backbone():
    purifier = create_purifier("diffpure.ddpm_cifar10")  # random weights, nothing downloaded
    assert purifier.t_star == 0.1 and purifier.sample_size == (32, 32)


def test_paper_settings_per_backbone():
    small = OracleBackbone(torch.rand(1, 3, 8, 8))  # instead of the 553M-parameter ImageNet network
    imagenet = create_purifier("ssni_saliency_diffpure.guided_imagenet256", backbone=small,
                               classifier=nn.Conv2d(3, 3, 1))
    assert (imagenet.eps_steps, imagenet.base.t_l, imagenet.base.t_s, imagenet.base.mask) == (50, 0.4, 0.2, "topk")
    assert create_purifier("diffpure.guided_imagenet256", backbone=small).t_star == 0.15
    cifar = create_purifier("ssni_saliency_diffpure.ddpm_cifar10", classifier=nn.Conv2d(3, 3, 1))
    assert (cifar.eps_steps, cifar.base.t_l, cifar.base.t_s, cifar.base.mask) == (20, 0.2, 0.1, "threshold")


def test_embedded_settings_travel_with_the_weights(monkeypatch):
    """The embedded default's variant settings are its shipped purifiers.json, not code."""
    from purifytf import hub

    shipped = json.loads((hub.ASSETS / "fashion-mnist/purifiers.json").read_text())
    assert hub.get_weights("fashion-mnist").purifier_settings == shipped
    saliency = create_purifier("saliency_diffpure.fashion_mnist", classifier=nn.Conv2d(1, 1, 1))
    assert {k: getattr(saliency, k) for k in shipped["saliency_diffpure"]} == shipped["saliency_diffpure"]
    changed = {**shipped, "diffpure": {"t_star": 0.15, "steps": 7}}
    monkeypatch.setitem(hub._REGISTRY, "fashion-mnist",
                        dataclasses.replace(hub.get_weights("fashion-mnist"), purifier_settings=changed))
    purifier = create_purifier("ssni_diffpure.fashion_mnist")
    assert (purifier.base.t_star, purifier.base.steps) == (0.15, 7)
    assert create_purifier("diffpure.fashion_mnist", steps=3).steps == 3  # overrides still win
    with pytest.raises(ValueError, match="unknown methods"):
        hub.Weights(name="x", purifier_settings={"dffpure": {}})


def test_defence_table_is_the_demos():
    table = defence_table()
    assert set(DEFENCES) <= set(table) and table["no defence"] == (None, {})
    built = default_defences(["no defence", "JPEGPurify (q=75)"])
    assert built["no defence"] is None and built["JPEGPurify (q=75)"].quality == 75
    with pytest.raises(ValueError, match="unknown defences"):
        default_defences(["nope"])


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def ssni_on_saliency(references, seed=7):
    base = SaliencyDiffPurify(OracleBackbone(references), tiny_classifier(), t_l=0.2, t_s=0.1, spacing=50)
    return SSNIPurify(base, eps_steps=3, stats={"mean": 30.0, "std": 3.0, "min": 20.0, "max": 40.0, "count": 10,
                                                   "eps_steps": 3},
                      seed=seed)


def test_ssni_around_saliency_reloads_to_identical_outputs(tmp_path):
    references = torch.rand(4, 1, 8, 8)
    purifier = ssni_on_saliency(references)
    x = torch.rand(3, 1, 8, 8)
    expected = purifier(x)
    purifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "SSNIPurify" and config["base"]["_class_name"] == "SaliencyDiffPurify"
    assert config["base"]["backbone"]["_class_name"] == "OracleBackbone" and "classifier" not in config["base"]
    classifier = tiny_classifier()
    for p in classifier.parameters():  # the saved weights, not these, must be used
        p.data.zero_()
    loaded = load_purifier(tmp_path, classifier=classifier)
    assert type(loaded) is SSNIPurify and loaded.seed == 7 and isinstance(loaded.base, SaliencyDiffPurify)
    assert torch.equal(loaded(x), expected) and torch.equal(loaded.last_t, purifier.last_t)
    with pytest.raises(TypeError, match="needs classifier="):
        load_purifier(tmp_path)
    with pytest.raises(TypeError, match="no part takes"):
        load_purifier(tmp_path, classifier=classifier, nonsense=1)


def test_every_config_names_its_class(tmp_path):
    references = torch.rand(2, 1, 8, 8)
    for purifier in (DiffPurify(OracleBackbone(references)), purifytf.JPEGPurify(), ssni_on_saliency(references)):
        purifier.save_pretrained(tmp_path / type(purifier).__name__)
        saved = json.loads((tmp_path / type(purifier).__name__ / "config.json").read_text())
        assert saved["_class_name"] == type(purifier).__name__
        assert type(Purifier.from_pretrained(tmp_path / type(purifier).__name__,
                                             **({"classifier": tiny_classifier()} if "base" in saved else {}))) \
            is type(purifier)
    with pytest.raises(TypeError, match="not a SSNIPurify"):
        SSNIPurify.from_pretrained(tmp_path / "DiffPurify")


def test_a_saved_folder_under_the_home_directory_loads_by_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    purifytf.JPEGPurify(quality=42).save_pretrained(tmp_path / "runs" / "jpeg")
    assert purifytf.load_purifier("~/runs/jpeg").quality == 42


def test_settings_changed_after_construction_are_saved(tmp_path):
    purifier = DiffPurify(OracleBackbone(torch.rand(2, 1, 8, 8)), t_star=0.1)
    purifier.seed, purifier.steps, purifier.checkpoint, purifier.t_star = 3, 4, True, 0.05
    purifier.backbone.max_t = 200
    purifier.save_pretrained(tmp_path)
    loaded = load_purifier(tmp_path)
    assert (loaded.seed, loaded.steps, loaded.checkpoint, loaded.t_star) == (3, 4, True, 0.05)
    assert loaded.backbone.max_t == 200
    ssni = ssni_on_saliency(torch.rand(4, 1, 8, 8))
    ssni.calibrate(torch.rand(4, 1, 8, 8))
    assert ssni.config["stats"] == ssni.stats
    # a setting with no attribute of its name is fixed at construction: IMPurify's architecture
    impure = IMPurify(preset="tiny", in_channels=1)
    assert not hasattr(impure, "preset") and impure.config["preset"] == "tiny"


def test_every_purifier_setting_is_live_or_fixed():
    """Every constructor setting of every purifier is an attribute of the same name (saved live) or has none."""
    references = torch.rand(2, 1, 8, 8)
    instances = [DiffPurify(OracleBackbone(references)), ssni_on_saliency(torch.rand(4, 1, 8, 8)),
                 IMPurify(in_channels=1), purifytf.JPEGPurify(), purifytf.BlurPurify(), purifytf.BitDepthPurify(),
                 purifytf.RandomResizePadPurify()]
    for purifier in instances:
        for name in purifier._settings():
            if hasattr(purifier, name) and not isinstance(getattr(purifier, name), nn.Module):
                assert purifier.config.get(name, "unsaved") == purifytf.config._encode(getattr(purifier, name))


def test_backbone_trained_range(tmp_path):
    backbone = OracleBackbone(torch.rand(2, 1, 8, 8))
    assert backbone.max_t == 1000 and backbone.config["max_t"] == 1000
    backbone.max_t = 400
    backbone.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["max_t"] == 400
    assert Backbone.from_pretrained(tmp_path).max_t == 400
    with pytest.raises(ValueError, match="max_t must be in"):
        backbone.max_t = 1001
    DiffPurify(backbone, t_star=0.4)  # exactly the trained range
    with pytest.raises(ValueError, match=r"t_star=0.5 .* 500 steps .*max_t = 400"):
        DiffPurify(backbone, t_star=0.5)
    with pytest.raises(ValueError, match="t_l=0.5.*max_t = 400"):
        SaliencyDiffPurify(backbone, tiny_classifier(), t_l=0.5, t_s=0.1)
    SaliencyDiffPurify(backbone, tiny_classifier(), t_l=0.397, t_s=0.1)  # U = 3 resampling steps reach 400
    with pytest.raises(ValueError, match=r"t_l=0.4 .*\(\+ 3 resampling steps\).*max_t = 400"):
        SaliencyDiffPurify(backbone, tiny_classifier(), t_l=0.4, t_s=0.1)  # its network calls reach t = 403
    with pytest.raises(ValueError, match=r"SSNI's t\* \+ bias.*max_t = 400"):
        SSNIPurify(DiffPurify(backbone, t_star=0.4), bias=0.005)
    with pytest.raises(ValueError, match=r"eps_steps must be in \[1, 400\].*got 600"):
        SSNIPurify(DiffPurify(backbone, t_star=0.1), eps_steps=600)  # the EPS would call the network at t = 600
    ok = DiffPurify(backbone, t_star=0.3)
    ok.t_star = 0.6  # changed after construction: refused when called
    with pytest.raises(ValueError, match="max_t = 400"):
        ok(torch.rand(1, 1, 8, 8))
    ok.t_star = 0.3
    ok.run(torch.rand(2, 1, 8, 8), None, rule=lambda x, generator: torch.tensor([0.5, 9.0]))  # a rule asking t = 2700
    assert ok.last_t.tolist() == [150, 400]  # held at the trained range
    saliency = SaliencyDiffPurify(backbone, tiny_classifier(), t_l=0.3, t_s=0.1)
    saliency.run(torch.rand(1, 1, 8, 8), None, rule=lambda x, generator: torch.tensor([9.0]))
    assert saliency.last_t.tolist() == [397]  # + 3 resampling steps: its calls stay within 400


def test_configs_saved_before_class_names_still_load(tmp_path):
    """Configs saved before class names were recorded count IMPurify's image_t/feature_t and SSNI's bias in steps;
    a current config that lost its class name is not rescaled."""
    saved = tmp_path / "impure"
    IMPurify.from_pretrained(ASSETS / "fashion-mnist" / "impure").save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k != "_class_name"}
    (saved / "config.json").write_text(json.dumps({**legacy, "image_t": 400, "feature_t": 600}))
    impure = IMPurify.from_pretrained(saved)
    assert (impure.image_t, impure.feature_t) == (0.4, 0.6)
    (saved / "config.json").write_text(json.dumps(legacy))
    impure = IMPurify.from_pretrained(saved)
    assert (impure.image_t, impure.feature_t) == (config["image_t"], config["feature_t"])
    base = DiffPurify(OracleBackbone(torch.rand(2, 1, 8, 8)))
    old = {"base": {"class": "DiffPurify", "config": {k: v for k, v in base.config.items() if k != "_class_name"}},
           "bias": 5.0, "eps_steps": 3}
    old["base"]["config"]["backbone"] = {"kind": "oracle", "num_references": 2, "channels": 1, "size": [8, 8]}
    ssni = SSNIPurify.from_config(old)
    assert ssni.bias == 0.005 and isinstance(ssni.base.backbone, OracleBackbone)
    assert SSNIPurify.from_config({**old, "bias": 0.005}).bias == 0.005
    with pytest.raises(ValueError, match="names no class"):
        Purifier.from_config({"t_star": 0.1})
