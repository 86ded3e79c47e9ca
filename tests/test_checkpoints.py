"""Real checkpoint layouts (against /work/shared/formats manifests), the guided-diffusion UNet, safe loading."""

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from purifytf.checkpoints import (
    convert_state_dict,
    cosine_schedule,
    diffusers_legacy_to_current,
    guided_diffusion_schedule,
    load_state_dict_file,
    schedule_from_diffusers,
)
from purifytf.diffusion.backbones import build_backbone, schedule_config
from purifytf.diffusion.guided_unet import GuidedDiffusionUNet, GuidedUNetModel, unet_kwargs_from_flags
from purifytf.hub import get_weights


@pytest.fixture
def manifest(formats_dir):
    """Load one of the shared checkpoint manifests by name."""
    return lambda name: json.loads((formats_dir / f"{name}.json").read_text())


def shapes(module):
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


def fake_state(state_shapes):
    return {k: torch.empty(s, device="meta") for k, s in state_shapes.items()}


TINY_GUIDED = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16,
                   use_scale_shift_norm=True, resblock_updown=True)


# --- guided-diffusion ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["guided_diffusion_256x256_uncond", "guided_diffusion_64x64_cond"])
def test_guided_unet_matches_manifest_names_shapes_and_order(name, manifest):
    m = manifest(name)
    kwargs = unet_kwargs_from_flags(m["config"])
    resolved = dict(m["unet_kwargs_resolved"])
    resolved["attention_resolutions"] = resolved.pop("attention_resolutions_ds")
    assert {k: kwargs[k] for k in resolved} == resolved
    with torch.device("meta"):
        net = GuidedUNetModel(**kwargs)
    assert shapes(net) == list(m["state_dict"].items())
    assert sum(p.numel() for p in net.parameters()) == m["num_params"]
    net.load_state_dict(fake_state(m["state_dict"]), strict=True, assign=True)


def test_guided_256_registry_entry_loads_the_checkpoint_layout_strictly(manifest):
    m = manifest("guided_diffusion_256x256_uncond")
    w = get_weights("guided-diffusion-256-uncond")
    assert w.url.endswith(m["checkpoint_file"]) and w.url in m["source"]
    with torch.device("meta"):
        backbone = build_backbone(w.config)
    assert isinstance(backbone, GuidedDiffusionUNet) and backbone.sample_size == (256, 256)
    for prefix in ("", "module."):  # plain file, or saved from a DataParallel wrapper
        raw = {prefix + k: v for k, v in fake_state(m["state_dict"]).items()}
        backbone.load_state_dict(convert_state_dict("guided_diffusion", raw), strict=True, assign=True)
    flags = m["config"]
    assert schedule_config(guided_diffusion_schedule(flags)) == w.config["schedule"]
    betas = 1 - guided_diffusion_schedule(flags).alphas_cumprod[:2]
    assert betas[0].item() == pytest.approx(m["diffusion"]["betas_first_last"][0], rel=1e-9)


def test_cosine_schedule_matches_diffusers(manifest):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    ours = guided_diffusion_schedule(manifest("guided_diffusion_64x64_cond")["config"]).alphas_cumprod
    torch.testing.assert_close(ours, cosine_schedule(1000).alphas_cumprod)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_guided_unet_small_forward_and_learned_sigma_slice():
    torch.manual_seed(0)
    backbone = GuidedDiffusionUNet(GuidedUNetModel(**TINY_GUIDED))
    for p in backbone.parameters():  # zero-initialised output layers would hide wiring errors
        p.data.normal_(0, 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 1000])  # schedule steps: the network gets 0 and 999
    full = backbone.unet(x, t - 1)
    assert full.shape == (2, 6, 16, 16)
    eps = backbone(x, t)
    assert eps.shape == (2, 3, 16, 16) and torch.equal(eps, full[:, :3])
    assert backbone(torch.randn(1, 3, 24, 24), t[:1]).shape == (1, 3, 24, 24)  # fully convolutional
    assert backbone.min_size == 2

    rebuilt = build_backbone(backbone.config)
    rebuilt.load_state_dict(backbone.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(x, t), eps)


def test_guided_unet_reduced_precision_inference():
    torch.manual_seed(0)
    net = GuidedUNetModel(**TINY_GUIDED)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    ref = net(x, t)
    half = GuidedUNetModel(**TINY_GUIDED, dtype="bfloat16")
    half.load_state_dict(net.state_dict(), strict=True)  # float32 checkpoint into the bf16 torso
    assert half.dtype == torch.bfloat16 and half.out[2].weight.dtype == torch.float32
    assert half.config["dtype"] == "bfloat16"
    out = half(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)
    assert torch.equal(net.convert_to(torch.bfloat16)(x, t), out)
    with pytest.raises(ValueError, match="dtype"):
        net.convert_to("int8")


def test_guided_unet_class_conditional():
    net = GuidedUNetModel(**{**TINY_GUIDED, "num_classes": 10, "use_new_attention_order": True})
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    assert net(x, t, torch.tensor([3, 4])).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="labels"):
        GuidedDiffusionUNet(net)


# --- diffusers google/ddpm-cifar10-32 --------------------------------------------------------------
def test_ddpm_cifar10_registry_entry_matches_manifest(manifest):
    m = manifest("diffusers_ddpm_cifar10_32")
    w = get_weights("ddpm-cifar10-32")
    assert w.repo_id == "google/ddpm-cifar10-32" and w.format == "diffusers_unet"
    assert w.config["unet"] == {k: v for k, v in m["hub_config_json"].items() if not k.startswith("_")}
    with torch.device("meta"):
        backbone = build_backbone(w.config)
    assert {k: v for k, v in backbone.config["unet"].items()} == m["config"]
    assert shapes(backbone.unet) == list(m["state_dict"].items())
    schedule = schedule_from_diffusers(m["scheduler_config"])
    assert schedule_config(schedule) == w.config["schedule"]
    betas = 1 - schedule.alphas_cumprod[:1]
    assert betas.item() == pytest.approx(m["scheduler_betas_first_last"][0], rel=1e-6)

    current = fake_state(m["state_dict"])
    legacy = {m["legacy_key_aliases"].get(k, k): v for k, v in current.items()}
    assert legacy.keys() != current.keys()
    assert list(diffusers_legacy_to_current(legacy)) == list(current)
    for raw in (current, legacy):  # either spelling loads strictly
        backbone.load_state_dict(convert_state_dict("diffusers_unet", raw), strict=True, assign=True)


def test_schedule_from_diffusers_variants():
    assert schedule_from_diffusers({"trained_betas": [0.1, 0.2]}).num_steps == 2
    scaled = schedule_from_diffusers({"beta_schedule": "scaled_linear", "num_train_timesteps": 10})
    assert scaled.num_steps == 10
    with pytest.raises(ValueError, match="unsupported"):
        schedule_from_diffusers({"beta_schedule": "sigmoid"})
    assert schedule_from_diffusers({"prediction_type": "epsilon"}).num_steps == 1000
    for prediction in ("v_prediction", "sample"):
        with pytest.raises(ValueError, match=f"predicts '{prediction}'.*eps-prediction"):
            schedule_from_diffusers({"prediction_type": prediction})
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        convert_state_dict("ckpt", {})


# --- safe file loading -----------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create ``marker``: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"weight": torch.zeros(2), "evil": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ValueError, match="refused") as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def _legacy_torch_save(state) -> bytes:
    """``state`` in torch's pre-zip pickle format."""
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def test_safe_loading_of_good_files_and_clear_errors(tmp_path):
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_file(state, tmp_path / "ok.safetensors")
    torch.save(state, tmp_path / "ok.pt")
    for name in ("ok.safetensors", "ok.pt"):
        got = load_state_dict_file(tmp_path / name)
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 7])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not safetensors at all")
    pt = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(pt[: len(pt) // 2])
    (tmp_path / "page.bin").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")
    (tmp_path / "legacy-truncated.bin").write_bytes(_legacy_torch_save(state)[:300])
    for name in ("truncated.safetensors", "garbage.safetensors", "truncated.pt", "page.bin", "legacy-truncated.bin"):
        with pytest.raises(ValueError, match="corrupt|truncated") as err:
            load_state_dict_file(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "refused" not in str(err.value)
    (tmp_path / "named.bin").write_bytes(data)  # a safetensors file under another suffix is read as one
    assert load_state_dict_file(tmp_path / "named.bin").keys() == state.keys()

    torch.save({"model": state, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat state_dict"):
        load_state_dict_file(tmp_path / "nested.pt")
