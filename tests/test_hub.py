"""Weights registry and downloads, offline: a local Hugging Face cache, file:// URLs, local hub folders."""

import hashlib
from pathlib import Path

import pytest
import torch

from purifytf import hub
from purifytf.diffusion.backbones import DiffusersUNet, build_backbone
from purifytf.diffusion.guided_unet import GuidedDiffusionUNet, GuidedUNetModel
from purifytf.purifiers.diffpure import DiffPurify

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_DIFFUSERS = {
    "sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
TINY_GUIDED = {"image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
               "attention_resolutions": [2], "channel_mult": [1, 1], "num_head_channels": 16,
               "use_scale_shift_norm": True, "resblock_updown": True}
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def make_hf_cache(cache: Path, repo_id: str, files: dict, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay ``files`` (path in repo -> bytes) out as huggingface_hub's cache: refs, snapshots, blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    return repo


def seeded(module):
    torch.manual_seed(0)
    for p in module.parameters():  # zero-initialised output layers would make every load look right
        p.data.normal_(0, 0.05)
    return module.eval()


def tiny_diffusers_backbone():
    from diffusers import UNet2DModel

    return seeded(DiffusersUNet(UNet2DModel(**TINY_DIFFUSERS)))


def legacy_diffusers_file(backbone) -> bytes:
    """The network's weights as early diffusers named them (query/key/value/proj_attn), as safetensors."""
    state = {}
    for key, value in backbone.unet.state_dict().items():
        for new, old in _LEGACY.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value.contiguous()
    assert any(".query." in k for k in state)
    from safetensors.torch import save

    return save(state)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so tests can register entries."""
    monkeypatch.setattr(hub, "_REGISTRY", dict(hub._REGISTRY))
    return hub._REGISTRY


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, registry):
    """HF_HUB_OFFLINE=1, an empty HF_HUB_CACHE and TORCH_HOME under tmp_path."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return cache


@pytest.fixture
def tiny_hf_weights(offline_cache):
    """A registered tiny diffusers backbone in the local Hub cache (legacy attention names, subfolder layout)."""
    backbone = tiny_diffusers_backbone()
    make_hf_cache(offline_cache, "purifytf-test/tiny-ddpm",
                  {"unet/diffusion_pytorch_model.safetensors": legacy_diffusers_file(backbone)})
    config = {**backbone.config, "unet": TINY_DIFFUSERS}
    hub.register_weights(hub.Weights(
        name="tiny-ddpm", repo_id="purifytf-test/tiny-ddpm", format="diffusers_unet", config=config,
        filenames=("diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        purifier_settings={"diffpure": {"t_star": 0.05}}, card={"datasets": ["cifar10"], "license": "apache-2.0"}))
    return backbone


def test_registry_lists_the_real_checkpoints(registry):
    assert {"ddpm-cifar10-32", "guided-diffusion-256-uncond", "score-sde-cifar10-ddpmpp-deep-continuous",
            "fashion-mnist"} <= set(hub.list_weights())
    with pytest.raises(KeyError, match="unknown weights"):
        hub.get_weights("nope")
    with pytest.raises(ValueError, match="already registered"):
        hub.register_weights(hub.get_weights("ddpm-cifar10-32"))
    with pytest.raises(ValueError, match="at most one"):
        hub.Weights(name="x", config={}, repo_id="a/b", url="https://example.com/x.pt")
    with pytest.raises(ValueError, match="unknown format 'diffusers'"):  # refused before any download
        hub.Weights(name="x", config={}, repo_id="a/b", format="diffusers")
    assert hub.get_weights("guided-diffusion-256-uncond").sha256 == hub.GUIDED_DIFFUSION_256_UNCOND_SHA256


def test_load_backbone_from_offline_hub_cache(tiny_hf_weights):
    backbone = hub.load_backbone("tiny-ddpm")
    assert isinstance(backbone, DiffusersUNet) and not backbone.training
    assert backbone.schedule.num_steps == 1000 and torch.isfinite(backbone.schedule.alphas_cumprod).all()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 600])
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, t), tiny_hf_weights(x, t))


def test_offline_without_cache_fails_at_once_naming_the_repo(offline_cache):
    with pytest.raises(FileNotFoundError) as err:
        hub.load_backbone("ddpm-cifar10-32")
    message = str(err.value)
    assert "google/ddpm-cifar10-32" in message and "hf download" in message and "HF_HUB_OFFLINE" in message


def test_revision_pinning(tiny_hf_weights, registry):
    make_hf_cache(Path(hub.os.environ["HF_HUB_CACHE"]), "purifytf-test/tiny-ddpm",
                  {"diffusion_pytorch_model.safetensors": b"not the pinned file"}, commit="f" * 40)  # moves main
    base = hub.get_weights("tiny-ddpm")
    pinned = hub.Weights(**{**base.__dict__, "name": "pinned", "revision": COMMIT})
    assert hub.weights_file(pinned).resolve().read_bytes() == legacy_diffusers_file(tiny_hf_weights)
    with pytest.raises(ValueError, match="corrupt or truncated"):  # main now holds a broken file
        hub.load_backbone(base)
    with pytest.raises(FileNotFoundError, match="e" * 40):
        hub.weights_file(hub.Weights(**{**base.__dict__, "name": "other", "revision": "e" * 40}))


def test_a_saved_backbone_on_the_hub_registers_by_repo_id_alone(offline_cache, tmp_path):
    """Weights naming only the repo of a ``Backbone.save_pretrained`` folder take its config.json."""
    backbone = seeded(tiny_diffusers_backbone())
    backbone.save_pretrained(tmp_path / "saved")
    make_hf_cache(offline_cache, "purifytf-test/saved", {name: (tmp_path / "saved" / name).read_bytes()
                                                         for name in ("config.json", "model.safetensors")})
    hub.register_weights(hub.Weights(name="saved-ddpm", repo_id="purifytf-test/saved"))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 600])
    with torch.no_grad():
        torch.testing.assert_close(hub.load_backbone("saved-ddpm")(x, t), backbone(x, t))
    mine = tmp_path / "my-cache"  # another cache, named by the caller: both files come from it
    mine.mkdir()
    (offline_cache / "models--purifytf-test--saved").rename(mine / "models--purifytf-test--saved")
    with torch.no_grad():
        torch.testing.assert_close(hub.load_backbone("saved-ddpm", cache_dir=mine)(x, t), backbone(x, t))


def test_hub_weights_are_checked_against_a_recorded_sha256(tiny_hf_weights):
    base = hub.get_weights("tiny-ddpm")
    good = hashlib.sha256(legacy_diffusers_file(tiny_hf_weights)).hexdigest()
    assert hub.weights_file(hub.Weights(**{**base.__dict__, "name": "hashed", "sha256": good})).exists()
    wrong = hub.Weights(**{**base.__dict__, "name": "wrong", "sha256": "0" * 64})
    with pytest.raises(ValueError, match="does not match the recorded sha256"):
        hub.weights_file(wrong)
    assert hub.weights_file(wrong, check_hash=False).exists()


def test_local_files_only_overrides_the_environment(tiny_hf_weights, monkeypatch):
    """With the environment online and the Hub answering, local_files_only=True still never asks the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "_unreachable", lambda url: None)
    real = hub.hf_hub_download

    def cache_only(*args, local_files_only=False, **kwargs):
        assert local_files_only, "asked the Hub"
        return real(*args, local_files_only=True, **kwargs)

    monkeypatch.setattr(hub, "hf_hub_download", cache_only)
    assert hub.weights_file("tiny-ddpm", local_files_only=True).name == "diffusion_pytorch_model.safetensors"
    with pytest.raises(AssertionError, match="asked the Hub"):
        hub.weights_file("tiny-ddpm", local_files_only=False)


def guided_url_weights(tmp_path, sha256):
    net = seeded(GuidedUNetModel(**TINY_GUIDED))
    src = tmp_path / "server" / "tiny_guided.pt"
    src.parent.mkdir()
    torch.save(net.state_dict(), src)
    config = {"kind": "guided_diffusion_unet", "schedule": {"kind": "linear", "num_steps": 1000},
              "unet": net.config}
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if sha256 == "right" else sha256
    return net, hub.Weights(name="tiny-guided", url=src.as_uri(), sha256=digest, format="guided_diffusion",
                            config=config)


def test_url_weights_checked_against_sha256(tmp_path, registry):
    net, w = guided_url_weights(tmp_path, "right")
    folder = tmp_path / "dl"
    backbone = hub.load_backbone(w, cache_dir=folder, local_files_only=False)
    assert isinstance(backbone, GuidedDiffusionUNet)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, t + 1), net(x, t)[:, :3])  # step t + 1 is the network's index t
    # offline, the cached copy is used and checked again
    assert hub.weights_file(w, cache_dir=folder, local_files_only=True) == folder / "tiny_guided.pt"
    (folder / "tiny_guided.pt").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        hub.weights_file(w, cache_dir=folder)
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        hub.weights_file(w, cache_dir=tmp_path / "empty", local_files_only=True)


def test_url_download_with_wrong_hash_is_rejected(tmp_path):
    _, w = guided_url_weights(tmp_path, "0" * 64)
    with pytest.raises(RuntimeError, match="invalid hash"):
        hub.weights_file(w, cache_dir=tmp_path / "dl", local_files_only=False)
    assert not (tmp_path / "dl" / "tiny_guided.pt").exists()


def test_url_without_known_hash_needs_explicit_opt_out(tmp_path):
    _, w = guided_url_weights(tmp_path, None)
    with pytest.raises(ValueError, match="check_hash=False"):
        hub.weights_file(w, cache_dir=tmp_path / "dl", local_files_only=False)
    assert hub.weights_file(w, cache_dir=tmp_path / "dl", local_files_only=False, check_hash=False).exists()
    with pytest.raises(ValueError, match="check_hash=False"):  # the real entry: hash still to be filled
        hub.weights_file("guided-diffusion-256-uncond", cache_dir=tmp_path / "dl")


def test_purifier_from_pretrained_local_dir_and_offline_hub_cache(tmp_path, offline_cache):
    purifier = DiffPurify(seeded(GuidedDiffusionUNet(GuidedUNetModel(**TINY_GUIDED))), t_star=0.02, steps=2,
                          sampler="ddim", seed=0)
    folder = tmp_path / "local-hub-dir"
    purifier.save_pretrained(folder)
    x = torch.rand(1, 3, 8, 8)
    expected = purifier(x)

    loaded_dir = DiffPurify.from_pretrained(folder)
    cache_files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    make_hf_cache(offline_cache, "purifytf-test/diffpure-guided", cache_files)
    loaded_hub = DiffPurify.from_pretrained("purifytf-test/diffpure-guided", cache_dir=offline_cache,
                                            local_files_only=True)
    for loaded in (loaded_dir, loaded_hub):
        assert isinstance(loaded.backbone, GuidedDiffusionUNet) and loaded.t_star == 0.02
        torch.testing.assert_close(loaded(x), expected)


def test_reduced_precision_backbone_round_trips(tmp_path):
    purifier = DiffPurify(GuidedDiffusionUNet(GuidedUNetModel(**TINY_GUIDED, dtype="bfloat16")))
    purifier.save_pretrained(tmp_path)
    loaded = DiffPurify.from_pretrained(tmp_path)
    assert loaded.backbone.unet.dtype == torch.bfloat16
    state = purifier.state_dict()
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in loaded.state_dict().items())


def test_model_card_metadata(tiny_hf_weights):
    purifier = DiffPurify(build_backbone(hub.get_weights("tiny-ddpm").config))
    card = hub.model_card(purifier, "tiny-ddpm", metrics=["accuracy"])
    assert card.data.library_name == "purifytf"
    assert {"adversarial-purification", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    assert card.data.datasets == ["cifar10"] and card.data.license == "apache-2.0"
    assert card.data.metrics == ["accuracy"]
    assert "datasets:" in str(card)


def test_save_pretrained_writes_the_full_card(tiny_hf_weights, tmp_path):  # noqa: F811
    from purifytf import pretrained

    purifier = pretrained.diff_purify(pretrained=True, weights="tiny-ddpm")
    purifier.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    for line in ("library_name: purifytf", "- cifar10", "- accuracy", "license: apache-2.0"):
        assert line in card
