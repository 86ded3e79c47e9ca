"""score_sde's NCSN++ network in its DDPM++ configuration (Song et al., ICLR 2021), re-implemented.

Only what the ``vp/cifar10_ddpmpp_deep_continuous`` checkpoint (DiffPure's CIFAR-10 model) uses: BigGAN-style
residual blocks that resample by nearest 2x upsampling / 2x2 mean pooling (``fir=False``), DDPM single-head pixel
attention, sinusoidal time embedding, no progressive growing, residuals rescaled by ``1/sqrt(2)``, GroupNorm with
``min(C/4, 32)`` groups, SiLU. Parameter names, shapes and order equal the reference ``NCSNpp``'s, so the checkpoint
loads with ``strict=True`` (layout ``"score_sde"`` of :data:`purifytf.checkpoints.FORMATS`).
:class:`NCSNppModel` is the bare network ``(x, label) -> eps``; :class:`ScoreSDEBackbone` wraps it as a purifytf
:class:`~purifytf.diffusion.Backbone`, mapping the discrete schedule step to the continuous VP-SDE time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, schedule_from_config
from .schedule import NoiseSchedule

__all__ = ["SCORE_SDE_CIFAR10_CONFIG", "NCSNppModel", "ScoreSDEBackbone", "vp_sde_schedule"]

_SQRT2 = math.sqrt(2.0)
_LABEL_SCALE = 999.0
"""Continuous VP models see the time ``s in [eps, 1]`` as the label ``999 s`` (score_sde ``get_score_fn``)."""


def _ddpm_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """score_sde's ``default_init``: uniform with variance ``scale / fan_avg`` (``scale=0`` means 1e-10)."""
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale or 1e-10))


def _conv(cin: int, cout: int, kernel: int = 3, scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    _ddpm_init_(conv.weight, scale)
    nn.init.zeros_(conv.bias)
    return conv


def _dense(cin: int, cout: int) -> nn.Linear:
    dense = nn.Linear(cin, cout)
    _ddpm_init_(dense.weight)
    nn.init.zeros_(dense.bias)
    return dense


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def timestep_embedding(labels: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """score_sde's sinusoidal embedding (B,) -> (B, dim): ``[sin(l f), cos(l f)]``, ``f_k = max_period^(-k/(dim/2-1))``.

    (guided-diffusion's differs: cos first, ``f_k = max_period^(-k/(dim/2))``.)
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=labels.device)
    freqs = torch.exp(-math.log(max_period) / (half - 1) * k)
    args = labels.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class NIN(nn.Module):
    """Per-pixel linear map on channel-last input (..., C_in) -> (..., C_out): ``x @ W + b``, ``W`` is (C_in, C_out)."""

    def __init__(self, cin: int, cout: int, scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(_ddpm_init_(torch.empty(cin, cout), scale))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.W + self.b


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels (DDPM's), residual: (B,C,H,W) -> ``(x + attn(x)) / sqrt(2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0, self.NIN_1, self.NIN_2 = (NIN(channels, channels) for _ in range(3))
        self.NIN_3 = NIN(channels, channels, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.GroupNorm_0(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = F.scaled_dot_product_attention(self.NIN_0(tokens), self.NIN_1(tokens), self.NIN_2(tokens))
        out = self.NIN_3(out).transpose(1, 2).reshape(b, c, h, w)
        return (x + out) / _SQRT2


class ResBlock(nn.Module):
    """BigGAN-style residual block conditioned on the time embedding (score_sde's ``ResnetBlockBigGANpp``).

    ``up``/``down`` resample both paths (nearest 2x / 2x2 mean) between the first norm and conv; a 1x1 ``Conv_2``
    maps the shortcut when the width or the size changes. Output: ``(shortcut + residual) / sqrt(2)``.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, up: bool = False, down: bool = False):
        super().__init__()
        self.up = up
        self.resample = nn.Upsample(scale_factor=2.0, mode="nearest") if up else nn.AvgPool2d(2) if down else None
        self.GroupNorm_0 = _group_norm(cin)
        self.Conv_0 = _conv(cin, cout)
        self.Dense_0 = _dense(temb_dim, cout)
        self.GroupNorm_1 = _group_norm(cout)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(cout, cout, scale=0.0)
        self.Conv_2 = _conv(cin, cout, kernel=1) if cin != cout or up or down else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = F.silu(self.GroupNorm_0(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2


class NCSNppModel(nn.Module):
    """score_sde's ``NCSNpp`` for the DDPM++ configuration; defaults are ``cifar10_ddpmpp_deep_continuous``'s.

    All layers sit in one flat ``all_modules`` list, as upstream: the two time-embedding dense layers, the input conv,
    the encoder (``num_res_blocks`` blocks per level, attention after each at ``attn_resolutions``, a downsampling
    block between levels), the middle (block, attention, block), the decoder (``num_res_blocks + 1`` blocks per level
    taking a skip each, attention once per level, an upsampling block between levels), then norm and output conv.
    The buffer ``sigmas`` (1000 VE noise levels, float64) is upstream's; this configuration never reads it, but the
    checkpoint carries it.

    Args:
        image_size: training resolution; with ``ch_mult`` it places the attention layers.
        in_channels: image channels (also the output channels).
        nf: base width; the time embedding has ``4 * nf`` channels.
        ch_mult: width multiplier per resolution level.
        num_res_blocks: residual blocks per encoder level.
        attn_resolutions: feature-map sides at which attention is used.
        dropout: dropout inside the residual blocks (training only).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.kwargs = {"image_size": image_size, "in_channels": in_channels, "nf": nf, "ch_mult": list(ch_mult),
                       "num_res_blocks": num_res_blocks, "attn_resolutions": list(attn_resolutions), "dropout": dropout}
        self.nf = nf
        sigmas = torch.linspace(math.log(50.0), math.log(0.01), 1000, dtype=torch.float64).exp()
        self.register_buffer("sigmas", sigmas)
        temb_dim = 4 * nf

        def res(cin: int, cout: int | None = None, **kw) -> ResBlock:
            return ResBlock(cin, cout or cin, temb_dim, dropout, **kw)

        modules: list[nn.Module] = [_dense(nf, temb_dim), _dense(temb_dim, temb_dim), _conv(in_channels, nf)]
        skips, ch, size = [nf], nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                modules.append(res(ch, nf * mult))
                ch = nf * mult
                if size in attn_resolutions:
                    modules.append(AttnBlock(ch))
                skips.append(ch)
            if level != len(ch_mult) - 1:
                modules.append(res(ch, down=True))
                skips.append(ch)
                size //= 2
        self._encoder_end = len(modules)
        modules += [res(ch), AttnBlock(ch), res(ch)]
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                modules.append(res(ch + skips.pop(), nf * mult))
                ch = nf * mult
            if size in attn_resolutions:
                modules.append(AttnBlock(ch))
            if level:
                modules.append(res(ch, up=True))
                size *= 2
        modules += [_group_norm(ch), _conv(ch, in_channels, scale=0.0)]
        self.all_modules = nn.ModuleList(modules)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able) that rebuild this network."""
        return dict(self.kwargs)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """(B, C, H, W) centred data in [-1, 1], (B,) time labels (``999 s`` at VP time ``s``) -> (B, C, H, W)."""
        mods, enc = self.all_modules, self._encoder_end
        temb = mods[1](F.silu(mods[0](timestep_embedding(labels, self.nf))))
        hs = [mods[2](x)]
        for layer in mods[3:enc]:
            if isinstance(layer, AttnBlock):
                hs[-1] = layer(hs[-1])
            else:
                hs.append(layer(hs[-1], temb))
        first, attn, second = mods[enc : enc + 3]
        h = second(attn(first(hs[-1], temb)), temb)
        for layer in mods[enc + 3 : -2]:
            if isinstance(layer, AttnBlock):
                h = layer(h)
            else:
                h = layer(h if layer.up else torch.cat([h, hs.pop()], dim=1), temb)
        norm, conv_out = mods[-2:]
        return conv_out(F.silu(norm(h)))


def vp_sde_schedule(beta_min: float = 0.1, beta_max: float = 20.0, num_steps: int = 1000) -> NoiseSchedule:
    """score_sde's ``VPSDE(beta_min, beta_max, N)`` discretised: DDPM betas ``linspace(beta_min/N, beta_max/N, N)``."""
    return NoiseSchedule.linear(num_steps, beta_min / num_steps, beta_max / num_steps)


class ScoreSDEBackbone(Backbone):
    """Backbone adapter for a continuous-time VP-SDE :class:`NCSNppModel` (score_sde / DiffPure's CIFAR-10 model).

    Time: step ``t`` (B,) of ``schedule`` becomes the VP-SDE time ``s`` whose marginal
    has the same noise level, ``alpha_bar_SDE(s) = schedule.alpha_bar(t)`` with
    ``-log alpha_bar_SDE(s) = beta_min s + (beta_max - beta_min) s^2 / 2``, capped at the horizon ``s = 1``; the
    network gets the label ``999 s`` (see :meth:`time_label`). So eps is predicted at exactly the noise level the
    sampler assumes, for any ``schedule``. On the default one (the VP-SDE discretised to 1000 steps, i.e. DDPM's
    linear betas 1e-4..0.02) the label is within 0.5 of the naive ``999 t / 1000`` for ``t <= 470`` (DiffPure
    diffuses to ``t = 100``), within 3.4 beyond, and capped at 999 for ``t >= 997``.

    Output: score_sde's score is ``-net(x, 999 s) / std(s)`` with ``std(s) = sqrt(1 - alpha_bar_SDE(s))``, so the
    network output is the eps prediction itself and is returned unscaled.

    Args:
        model: the network.
        schedule: discrete schedule of the purifiers (default: :func:`vp_sde_schedule` of ``beta_min``, ``beta_max``).
        beta_min, beta_max: the VP-SDE the network was trained on, ``beta(s) = beta_min + s (beta_max - beta_min)``.
    """

    kind = "score_sde_ncsnpp"

    def __init__(self, model: NCSNppModel, schedule: NoiseSchedule | None = None,
                 beta_min: float = 0.1, beta_max: float = 20.0):
        size = model.kwargs["image_size"]
        schedule = schedule if schedule is not None else vp_sde_schedule(beta_min, beta_max)
        super().__init__(model.kwargs["in_channels"], (size, size), schedule)
        self.model = model
        self.beta_min, self.beta_max = beta_min, beta_max
        self.min_size = 2 ** (len(model.kwargs["ch_mult"]) - 1)

    def time_label(self, t: Tensor) -> Tensor:
        """Network label ``999 s`` (B,) float64 for schedule steps ``t`` (B,), integer or float (differentiable)."""
        neg_log_abar = -self.schedule.alpha_bar(t, like=t.to(torch.float64)).log()  # (B,) float64
        b0, slope = self.beta_min, self.beta_max - self.beta_min
        # the positive root of b0 s + slope s^2 / 2 = -log abar, in a form without cancellation
        s = 2 * neg_log_abar / (b0 + (b0**2 + 2 * slope * neg_log_abar).sqrt())
        return _LABEL_SCALE * s.clamp(max=1.0)

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.model(x_t, self.time_label(t))

    def _config(self) -> dict[str, Any]:
        return {"model": self.model.config, "sde": {"beta_min": self.beta_min, "beta_max": self.beta_max}}

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> ScoreSDEBackbone:
        schedule = schedule_from_config(config.get("schedule"))
        return cls(NCSNppModel(**config["model"]), schedule, **config.get("sde", {}))


SCORE_SDE_CIFAR10_CONFIG: dict[str, Any] = {
    "_class_name": "ScoreSDEBackbone",
    "max_t": 1000,
    "schedule": {"kind": "linear", "num_steps": 1000},
    "model": {"image_size": 32, "in_channels": 3, "nf": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 8,
              "attn_resolutions": [16], "dropout": 0.1},
    "sde": {"beta_min": 0.1, "beta_max": 20.0},
}
""":attr:`~purifytf.diffusion.Backbone.config` of score_sde's ``vp/cifar10_ddpmpp_deep_continuous``
``checkpoint_8.pth`` (load it with the ``"score_sde"`` layout of :data:`purifytf.checkpoints.FORMATS`)."""
