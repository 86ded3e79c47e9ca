"""score_sde's DDPM++ network: the real checkpoint's layout (shared/formats manifest), its EMA converter, the
VP time/eps mapping of the backbone, the registry round trip and DiffPurify on a small configuration."""

import json
import math

import pytest
import torch
from torch import nn

from purifytf import DiffPurify
from purifytf.checkpoints import convert_state_dict, load_state_dict_file
from purifytf.diffusion import NCSNppModel, ScoreSDEBackbone, build_backbone
from purifytf.diffusion.score_sde import SCORE_SDE_CIFAR10_CONFIG, timestep_embedding

SMALL = dict(image_size=16, nf=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])
B0, B1 = 0.1, 20.0  # the checkpoint's VP-SDE
HARD_CODED = {"resblock_type": "biggan", "attention_type": "ddpm", "embedding_type": "positional",
              "progressive": "none", "progressive_input": "none", "fir": False, "skip_rescale": True,
              "conditional": True, "nonlinearity": "swish", "normalization": "GroupNorm", "scale_by_sigma": False,
              "init_scale": 0.0, "conv_size": 3}
"""score_sde flags the re-implementation supports only at these values."""


@pytest.fixture
def manifest(formats_dir):
    return json.loads((formats_dir / "score_sde_cifar10_ddpmpp_deep_continuous.json").read_text())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small_backbone(seed=0) -> ScoreSDEBackbone:
    """Small network with random weights everywhere (upstream's init nearly zeroes the output layers)."""
    model = NCSNppModel(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen(seed)))
            seed += 1
    return ScoreSDEBackbone(model).eval()


def images(n=2, seed=1):
    return torch.rand(n, 3, 16, 16, generator=gen(seed)) * 2 - 1


def training_checkpoint(model: NCSNppModel) -> dict:
    """What score_sde's ``save_checkpoint`` writes: DataParallel state, EMA state (weights + 1), Adam state, step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: Adam state exists, weights unchanged
    wrapper = nn.Module()
    wrapper.module = model  # state_dict keys "module.*", like torch.nn.DataParallel's
    shadow = [p.detach() + 1 for p in model.parameters()]
    return {"optimizer": optimizer.state_dict(), "model": wrapper.state_dict(),
            "ema": {"decay": 0.9999, "num_updates": 8, "shadow_params": shadow}, "step": 8}


# --- the real checkpoint's layout -------------------------------------------------------------------------------
def test_full_model_has_the_checkpoint_names_shapes_and_order(manifest):
    cfg = manifest["config"]
    assert {k: cfg["model"][k] for k in HARD_CODED} == HARD_CODED
    assert cfg["data"]["centered"] and cfg["training"]["continuous"] and cfg["training"]["sde"] == "vpsde"
    assert SCORE_SDE_CIFAR10_CONFIG["sde"] == {k: cfg["model"][k] for k in ("beta_min", "beta_max")}
    kwargs = {"image_size": cfg["data"]["image_size"], "in_channels": cfg["data"]["num_channels"],
              **{k: cfg["model"][k] for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")}}
    assert kwargs == SCORE_SDE_CIFAR10_CONFIG["model"]
    with torch.device("meta"):
        model = NCSNppModel(**kwargs)
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(manifest["state_dict"].items())
    assert [[k, list(p.shape)] for k, p in model.named_parameters()] == manifest["parameters_order"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    sigmas = NCSNppModel(**SMALL).sigmas  # upstream's get_sigmas(config), float64
    m = cfg["model"]
    expected = torch.linspace(math.log(m["sigma_max"]), math.log(m["sigma_min"]), m["num_scales"], dtype=torch.float64)
    assert sigmas.dtype == torch.float64 and torch.allclose(sigmas, expected.exp(), rtol=1e-12)


def test_full_checkpoint_loads_strictly_through_the_score_sde_format(manifest):
    flat = {**{f"model.module.{k}": torch.empty(s, device="meta") for k, s in manifest["state_dict"].items()},
            **{f"ema.shadow_params.{i}": torch.empty(s, device="meta")
               for i, (_, s) in enumerate(manifest["parameters_order"])}}  # as load_state_dict_file flattens it
    with torch.device("meta"):
        backbone = build_backbone(SCORE_SDE_CIFAR10_CONFIG)
    assert isinstance(backbone, ScoreSDEBackbone)
    assert (backbone.in_channels, backbone.sample_size, backbone.min_size) == (3, (32, 32), 8)
    backbone.load_state_dict(convert_state_dict("score_sde", flat), strict=True, assign=True)


# --- converter on a synthetic checkpoint_8.pth --------------------------------------------------------------------
def test_training_checkpoint_is_read_safely_and_loads_the_ema_weights(tmp_path):
    source = NCSNppModel(**SMALL)
    ckpt = training_checkpoint(source)
    path = tmp_path / "checkpoint_8.pth"
    torch.save(ckpt, path)
    assert torch.load(path, weights_only=True).keys() == ckpt.keys()  # tensors, ints, floats, dicts, lists only
    backbone = ScoreSDEBackbone(NCSNppModel(**SMALL))
    backbone.load_state_dict(convert_state_dict("score_sde", load_state_dict_file(path)), strict=True)
    for (name, p), ema, raw in zip(backbone.model.named_parameters(), ckpt["ema"]["shadow_params"],
                                   source.parameters(), strict=True):
        assert torch.equal(p, ema) and not torch.equal(p, raw), name
    assert torch.equal(backbone.model.sigmas, source.sigmas)


def test_score_sde_format_rejects_an_ema_list_of_another_network():
    ckpt = training_checkpoint(NCSNppModel(**SMALL))
    flat = {**{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.shadow_params.{i}": p for i, p in enumerate(ckpt["ema"]["shadow_params"])}}
    last = f"ema.shadow_params.{len(ckpt['ema']['shadow_params']) - 1}"
    with pytest.raises(ValueError, match="EMA tensors"):
        convert_state_dict("score_sde", {k: v for k, v in flat.items() if k != last})
    flat["ema.shadow_params.0"] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict("score_sde", flat)


# --- the network and the backbone mapping -------------------------------------------------------------------------
def test_small_forward_has_the_input_shape_is_deterministic_and_differentiable():
    backbone = small_backbone()
    x, t = images(), torch.tensor([1, 500])
    out = backbone(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0.1
    assert torch.equal(out, backbone(x, t))
    x.requires_grad_(True)
    t_float = torch.tensor([10.3, 400.7], requires_grad=True)
    backbone(x, t_float).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(t_float.grad).all() and (t_float.grad != 0).all()


def test_timestep_embedding_is_score_sde_s():
    labels = torch.tensor([0.0, 99.5, 999.0])
    k = torch.arange(8, dtype=torch.float64)
    args = labels.double()[:, None] * 10000 ** (-k / 7)  # sin block first, exponent k / (dim/2 - 1)
    torch.testing.assert_close(timestep_embedding(labels, 16), torch.cat([args.sin(), args.cos()], 1).float(),
                               atol=1e-4, rtol=0)  # float32 arguments up to 999


def test_time_label_gives_the_vp_sde_time_with_the_schedule_s_noise_level():
    backbone = small_backbone()
    betas = torch.linspace(B0 / 1000, B1 / 1000, 1000, dtype=torch.float64)  # score_sde's VPSDE.discrete_betas
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(backbone.schedule.alphas_cumprod, abar, rtol=1e-12, atol=0)
    t = torch.arange(1, 1001)  # schedule steps
    label = backbone.time_label(t)
    s = label / 999
    log_mean_coeff = -0.25 * s**2 * (B1 - B0) - 0.5 * s * B0  # VPSDE.marginal_prob
    inside = s < 1
    assert inside[:990].all() and (s <= 1).all() and s[-1] == 1  # the last steps lie past the horizon: capped
    torch.testing.assert_close((2 * log_mean_coeff).exp()[inside], abar[inside], rtol=1e-9, atol=0)
    assert (label - 999 * t / 1000)[:470].abs().max() < 0.5  # close to the naive map over DiffPure's range
    torch.testing.assert_close(backbone.time_label(t[:50].double()), label[:50])  # floats agree on integers
    mid = backbone.time_label(torch.tensor([10.5]))
    assert label[9] < mid < label[10]


def test_output_is_eps_so_score_sde_s_score_is_the_schedule_s():
    backbone = small_backbone()
    x, t = images(3), torch.tensor([4, 100, 701])  # schedule steps
    seen = []
    backbone.model.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    eps = backbone(x, t)
    torch.testing.assert_close(seen[0], backbone.time_label(t))
    assert torch.equal(eps, backbone.model(x, seen[0]))  # network output returned unscaled
    s = seen[0] / 999  # score_sde get_score_fn, continuous VP: score = -net(x, 999 s) / std(s)
    std = (1 - torch.exp(-(B0 * s + 0.5 * (B1 - B0) * s**2))).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(-eps / std, backbone.schedule.eps_to_score(eps, t), rtol=1e-4, atol=0)


# --- registry and purifier ------------------------------------------------------------------------------------
def test_config_round_trips_through_the_registry():
    backbone = small_backbone()
    config = json.loads(json.dumps(backbone.config))
    assert config == {"_class_name": "ScoreSDEBackbone", "max_t": 1000,
                      "schedule": {"kind": "linear", "num_steps": 1000},
                      "model": {"in_channels": 3, "dropout": 0.1, **SMALL}, "sde": {"beta_min": B0, "beta_max": B1}}
    rebuilt = build_backbone(config).eval()
    assert isinstance(rebuilt, ScoreSDEBackbone) and rebuilt.config == config
    rebuilt.load_state_dict(backbone.state_dict(), strict=True)
    x, t = images(), torch.tensor([5, 50])
    assert torch.equal(rebuilt(x, t), backbone(x, t))
    with torch.device("meta"):
        assert ScoreSDEBackbone(NCSNppModel()).config == SCORE_SDE_CIFAR10_CONFIG
    other = ScoreSDEBackbone(NCSNppModel(**SMALL), beta_min=0.2, beta_max=10.0)
    assert build_backbone(other.config).config == other.config and other.config["schedule"]["kind"] == "table"


def test_diffpurify_runs_end_to_end():
    purifier = DiffPurify(small_backbone(), t_star=0.1, steps=2, seed=0)
    x = torch.rand(2, 3, 16, 16, generator=gen(2))
    out = purifier(x)
    assert out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert purifier.last_nfe == 2


def test_registered_without_a_download_source(tmp_path):
    from purifytf import hub

    with pytest.raises(FileNotFoundError, match="no verified download source"):
        hub.load_backbone("score-sde-cifar10-ddpmpp-deep-continuous")
    assert hub.get_weights("score-sde-cifar10-ddpmpp-deep-continuous").config == SCORE_SDE_CIFAR10_CONFIG


def test_load_backbone_from_a_local_checkpoint(tmp_path):
    """``path=`` loads a local copy through the registry's config and layout (here a small stand-in entry)."""
    from purifytf import hub

    config = {**SCORE_SDE_CIFAR10_CONFIG, "model": SMALL}
    weights = hub.Weights(name="small-score-sde", config=config, format="score_sde")
    source = build_backbone(config)
    state = {k.removeprefix("model."): v for k, v in source.state_dict().items()}
    names = [k for k in state if k != "sigmas"]
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": [state[k] + 1 for k in names]},
                "step": 1}, tmp_path / "checkpoint_8.pth")
    loaded = hub.load_backbone(weights, path=tmp_path / "checkpoint_8.pth")
    assert torch.equal(loaded.model.state_dict()[names[0]], state[names[0]] + 1)
