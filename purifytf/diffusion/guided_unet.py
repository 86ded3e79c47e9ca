"""The ablated-diffusion UNet of OpenAI's guided-diffusion (Dhariwal & Nichol, 2021), re-implemented.

Parameter names, shapes and order equal the reference ``UNetModel``, so its published checkpoints
(e.g. ``256x256_diffusion_uncond.pt``, DiffPure's ImageNet backbone) load with ``strict=True``.
:class:`GuidedUNetModel` is the bare network ``(x, t[, y]) -> out``; :class:`GuidedDiffusionUNet`
wraps it as a purifytf :class:`~purifytf.diffusion.Backbone`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, schedule_from_config
from .schedule import NoiseSchedule, network_timestep

__all__ = ["GuidedDiffusionUNet", "GuidedUNetModel", "unet_kwargs_from_flags"]

_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def unet_kwargs_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """:class:`GuidedUNetModel` arguments from guided-diffusion's command-line flags (its README's)."""
    size = flags["image_size"]
    mult = flags.get("channel_mult", "")
    if isinstance(mult, str):
        mult = tuple(float(m) if "." in m else int(m) for m in mult.split(",")) if mult else None
    if mult is None:
        if size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {size}")
        mult = _DEFAULT_CHANNEL_MULT[size]
    resolutions = flags.get("attention_resolutions", "16,8")
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",")]
    return {
        "image_size": size,
        "in_channels": 3,
        "model_channels": flags["num_channels"],
        "out_channels": 6 if flags.get("learn_sigma", False) else 3,
        "num_res_blocks": flags["num_res_blocks"],
        "attention_resolutions": sorted(size // r for r in resolutions),
        "dropout": flags.get("dropout", 0.0),
        "channel_mult": list(mult),
        "num_classes": 1000 if flags.get("class_cond", False) else None,
        "num_heads": flags.get("num_heads", 4),
        "num_head_channels": flags.get("num_head_channels", -1),
        "num_heads_upsample": flags.get("num_heads_upsample", -1),
        "use_scale_shift_norm": flags.get("use_scale_shift_norm", True),
        "resblock_updown": flags.get("resblock_updown", False),
        "use_new_attention_order": flags.get("use_new_attention_order", False),
    }


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): ``[cos(t f), sin(t f)]``, ``f`` geometric from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Resample(nn.Module):
    """Nearest 2x upsampling or 2x downsampling, with a 3x3 conv (named ``conv``/``op`` as upstream) or without."""

    def __init__(self, channels: int, up: bool, use_conv: bool):
        super().__init__()
        self.up = up
        self.conv_name = ("conv" if up else "op") if use_conv else None
        if use_conv:
            self.add_module(self.conv_name, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        conv = getattr(self, self.conv_name) if self.conv_name else None
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        elif conv is None:
            return F.avg_pool2d(x, 2)
        return x if conv is None else conv(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = up or down
        self.h_upd = _Resample(channels, up, use_conv=False)
        self.x_upd = _Resample(channels, up, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample:
            h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a fused 1x1 ``qkv`` conv.

    ``new_order=False`` (upstream's legacy layout) splits ``qkv`` per head into (q, k, v); ``True`` splits it
    into q, k, v first, then into heads.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        heads, length = self.num_heads, x.shape[-1]
        if self.new_order:
            q, k, v = qkv.reshape(b, 3, heads, c // heads, length).unbind(1)
        else:
            q, k, v = qkv.reshape(b, heads, 3 * c // heads, length).chunk(3, dim=2)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class _EmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the residual blocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class GuidedUNetModel(nn.Module):
    """guided-diffusion's ``UNetModel`` (2-D): same constructor arguments, parameter names and forward.

    Args:
        image_size: training resolution (informative; the network is fully convolutional).
        in_channels, model_channels, out_channels: image channels in, base width, channels out
            (``2 * in_channels`` for learned-sigma models: eps, then the variance interpolation).
        num_res_blocks: residual blocks per resolution.
        attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention is used.
        dropout: dropout in the residual blocks.
        channel_mult: width multiplier per resolution.
        conv_resample: learned 3x3 conv in the plain up/downsamplers (``resblock_updown=False``).
        num_classes: class-conditional with a label embedding when set.
        num_heads, num_head_channels, num_heads_upsample: attention heads (a fixed head width wins when
            ``num_head_channels != -1``; ``num_heads_upsample=-1`` means ``num_heads``).
        use_scale_shift_norm: FiLM-like ``norm(h) * (1 + scale) + shift`` conditioning.
        resblock_updown: resample with residual blocks instead of plain up/downsamplers.
        use_new_attention_order: split qkv before heads (see :class:`AttentionBlock`).
        dtype: compute dtype of the torso (``"float16"``/``"bfloat16"`` for fast inference): its convolutions
            are stored in it and activations run in it; embeddings, norms and the output head stay float32.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        dtype: str | torch.dtype = "float32",
    ):
        super().__init__()
        self.kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "dtype")}
        self.kwargs.update(attention_resolutions=list(attention_resolutions), channel_mult=list(channel_mult))
        self.model_channels = model_channels
        self.num_classes = num_classes
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(cin: int, cout: int, **kw) -> ResBlock:
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm, **kw)

        def attn(c: int, heads: int) -> AttentionBlock:
            return AttentionBlock(c, heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else _Resample(ch, False, conv_resample)
                self.input_blocks.append(_EmbedSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = _EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else _Resample(ch, True, conv_resample))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.convert_to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the torso."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to(self, dtype: str | torch.dtype) -> GuidedUNetModel:
        """Store the torso's convolutions in ``dtype`` and run the torso in it (upstream's ``convert_to_fp16``)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.to(dtype)
        return self

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able) that rebuild this network."""
        return {**self.kwargs, "dtype": str(self.dtype).removeprefix("torch.")}

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1], (B,) timesteps [, (B,) labels] -> (B, out_channels, H, W) in ``x``'s dtype."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(self.out[2].weight.dtype)).to(x.dtype)


class GuidedDiffusionUNet(Backbone):
    """Backbone adapter for :class:`GuidedUNetModel` (unconditional models; eps = first ``in_channels`` outputs)."""

    kind = "guided_diffusion_unet"

    def __init__(self, unet: GuidedUNetModel, schedule: NoiseSchedule | None = None):
        if unet.num_classes is not None:
            raise ValueError("class-conditional guided-diffusion models need labels, which the Backbone "
                             "protocol does not carry; use GuidedUNetModel directly")
        size = unet.kwargs["image_size"]
        super().__init__(unet.kwargs["in_channels"], (size, size), schedule)
        self.unet = unet
        self.min_size = 2 ** (len(unet.kwargs["channel_mult"]) - 1)

    def _predict(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, network_timestep(t))

    def _config(self) -> dict[str, Any]:
        return {"unet": self.unet.config}

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> GuidedDiffusionUNet:
        return cls(GuidedUNetModel(**config["unet"]), schedule_from_config(config.get("schedule")))
