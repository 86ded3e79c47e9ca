"""The information-masking reconstruction network of IMPure (Liu et al., arXiv 2311.15339).

An MAE-style ViT that predicts every patch from the other patches of the image:

1. The (padded) patch grid is split into ``G = 4`` equal groups: the fixed interleaved stride-2
   sub-grids at inference, a random partition in training (:func:`interleaved_order`,
   :func:`random_order`).
2. Each group is encoded on its own (a batch of ``B * G`` short sequences), once for the image
   and once for the image noised with ``q_sample`` (``image_t``).
3. Decoder pass ``i`` sees the clean latents of every group but ``i``; the slots of group ``i``
   hold the *noised* image's latents of group ``i``, noised again in feature space
   (``feature_t``). Its class token is built from the class tokens of the other groups only.
   All ``G`` passes are one batched decoder call; pass ``i`` predicts the patches of group ``i``.
4. The predictions are assembled, refined by a 3x3 conv and cropped back to the input size.

So every patch is predicted exactly once, from a pass where its own group was hidden (up to the
noised copy in its slots, and the 3x3 head mixing the pixels next to patch borders).

Images enter in [0, 1] and are mapped to [-1, 1] inside; any size works: the input is zero-padded
(:meth:`MaskedReconstructor.pad`) to a multiple of ``2 * patch_size`` so that the grid splits into four
equal interleaved groups, sin-cos position embeddings are computed for that grid, and the output is
cropped back. The padding is constant, never a copy of the image: a padded patch belongs to another
group than the pixels next to it, so a copy would show a hidden group its own pixels.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..diffusion.schedule import NoiseSchedule
from ..functional import to_image_space, to_model_space
from ..nfe import record_nfe
from ..random import rand_like, randn_like

__all__ = [
    "MAE_PRESETS",
    "MAEConfig",
    "MaskedReconstructor",
    "build_reconstructor",
    "interleaved_order",
    "load_deepened",
    "random_order",
]

GROUPS = 4


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Size of a :class:`MaskedReconstructor` (``fuse_indices``: encoder blocks whose outputs are fused).

    ``train_image_t`` / ``train_feature_t``: ``[lo, hi)`` ranges of the image and feature noise levels
    drawn per sample in training, as fractions of the T = 1000 steps (reference: U[0.2, 0.6) and U[0.2, 1)).
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    fuse_indices: tuple[int, ...]
    mlp_ratio: float = 4.0
    train_image_t: tuple[float, float] = (0.2, 0.6)
    train_feature_t: tuple[float, float] = (0.2, 1.0)


MAE_PRESETS: dict[str, MAEConfig] = {
    # CPU-trainable, for 28x28 / 32x32 data (7x7 -> padded 8x8 patch grid).
    "tiny": MAEConfig(patch_size=4, embed_dim=128, depth=4, num_heads=4, decoder_dim=128, decoder_depth=2,
                      decoder_heads=4, fuse_indices=(0, 2)),
    # The reference: ViT-B/16 encoder, 8 x 512 decoder, for 224 x 224 ImageNet input.
    "base": MAEConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8,
                      decoder_heads=16, fuse_indices=(0, 2, 4, 6, 8)),
}


def build_reconstructor(preset: str = "tiny", in_channels: int = 3, **overrides) -> MaskedReconstructor:
    """A :class:`MaskedReconstructor` of size ``MAE_PRESETS[preset]``, fields replaced by ``overrides``."""
    if preset not in MAE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(MAE_PRESETS)}")
    for name in ("fuse_indices", "train_image_t", "train_feature_t"):  # JSON configs hold lists
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return MaskedReconstructor(dataclasses.replace(MAE_PRESETS[preset], **overrides), in_channels)


def interleaved_order(h: int, w: int, batch: int, device=None) -> Tensor:
    """The inference partition: group ``2 * (row % 2) + col % 2`` of an even ``h x w`` grid.

    Returns ``order`` (B, L): patch indices (row-major) sorted by group, group ``g`` being
    ``order[:, g * L // 4 : (g + 1) * L // 4]``.
    """
    rows = torch.arange(h, device=device).remainder(2).view(h, 1)
    cols = torch.arange(w, device=device).remainder(2).view(1, w)
    labels = (2 * rows + cols).flatten()
    return torch.argsort(labels, stable=True).expand(batch, -1)


def random_order(h: int, w: int, batch: int, generator: torch.Generator | None, device=None) -> Tensor:
    """A random partition into 4 equal groups, per sample (same layout as :func:`interleaved_order`)."""
    return torch.argsort(rand_like(torch.empty(batch, h * w, device=device), generator), dim=1)


def _uniform_t(bounds: tuple[float, float], steps: int, batch: int, generator, device) -> Tensor:
    """(B,) integer timesteps drawn uniformly from ``[lo * steps, hi * steps)``."""
    lo, hi = round(bounds[0] * steps), round(bounds[1] * steps)
    u = rand_like(torch.empty(batch, device=device), generator)
    return (lo + (u * (hi - lo)).long()).clamp(max=hi - 1)


class MaskedReconstructor(nn.Module):
    """IMPure's reconstruction network (see the module docstring).

    ``forward(x, generator, image_t, feature_t, train=False)``: images (B, C, H, W) in [0, 1] ->
    reconstruction (B, C, H, W), roughly in [0, 1] (unclamped). One call is one network
    evaluation (NFE).
    """

    def __init__(self, config: MAEConfig, in_channels: int = 3):
        super().__init__()
        self.schedule = NoiseSchedule.linear()
        if config.embed_dim % 4 or config.decoder_dim % 4:
            raise ValueError("embed_dim and decoder_dim must be multiples of 4 (2-D sin-cos embeddings)")
        if any(not 0 <= i < config.depth - 1 for i in config.fuse_indices):
            raise ValueError(f"fuse_indices must lie in [0, depth - 1), got {config.fuse_indices}")
        for name in ("train_image_t", "train_feature_t"):
            lo, hi = getattr(config, name)
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"{name} must be fractions of T with 0 <= lo < hi <= 1, got {(lo, hi)}")
        self.config = config
        self.in_channels = in_channels
        p, dim, dec = config.patch_size, config.embed_dim, config.decoder_dim
        self.patch_embed = nn.Conv2d(in_channels, dim, p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, config.num_heads, config.mlp_ratio, qkv_bias=True)
                                    for _ in range(config.depth))
        self.fuse_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in config.fuse_indices)
        self.fuse_logits = nn.Parameter(torch.ones(len(config.fuse_indices) + 1))
        self.norm = nn.LayerNorm(dim)

        self.decoder_embed = nn.Sequential(nn.Linear(dim, dec), nn.LayerNorm(dec))
        self.decoder_head = nn.Linear(dim * (GROUPS - 1), dec)
        self.decoder_blocks = nn.ModuleList(Block(dec, config.decoder_heads, config.mlp_ratio, qkv_bias=True)
                                            for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec)
        self.decoder_pred = nn.Linear(dec, p * p * in_channels)
        self.conv_head = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE initialisation; the conv head starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.dirac_(self.conv_head.weight)
        nn.init.zeros_(self.conv_head.bias)

    # --- geometry ----------------------------------------------------------------------------
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an image, both even: the padded size is ``(h * p, w * p)``."""
        step = 2 * self.config.patch_size
        return 2 * math.ceil(height / step), 2 * math.ceil(width / step)

    def pad(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> model space [-1, 1], zero-padded (image-space 0) at the bottom and
        right to the grid of :meth:`grid`: (B, C, h*p, w*p)."""
        h, w = self.grid(*x.shape[-2:])
        p = self.config.patch_size
        return F.pad(to_model_space(x), (0, w * p - x.shape[-1], 0, h * p - x.shape[-2]), value=-1.0)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, h*p, w*p) -> (B, h*w, p*p*C)."""
        p = self.config.patch_size
        b, c, hp, wp = x.shape
        x = x.reshape(b, c, hp // p, p, wp // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hp // p) * (wp // p), p * p * c)

    def unpatchify(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        p, c = self.config.patch_size, self.in_channels
        x = tokens.reshape(tokens.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, h * p, w * p)

    # --- the passes --------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Padded images (B, C, h*p, w*p) in [-1, 1] -> tokens (B, h*w, D) with position embeddings."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        h, w = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        return tokens + build_sincos2d_pos_embed([h, w], tokens.shape[-1], device=x.device, dtype=x.dtype)

    def encode(self, tokens: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        """Encode each group alone: tokens (B, L, D), order (B, L) -> latents (B, G, L/G, D), heads (B, G, D).

        Latents are in group-major order (``order``); the encoder output is the softmax-weighted
        sum of the projected outputs of blocks ``fuse_indices`` and of the last block.
        """
        b, length, dim = tokens.shape
        grouped = torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, dim))
        x = grouped.reshape(b * GROUPS, length // GROUPS, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        fused = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.config.fuse_indices:
                fused.append(self.fuse_proj[self.config.fuse_indices.index(index)](x))
        weights = self.fuse_logits.softmax(0)
        x = self.norm(sum(wt * out for wt, out in zip(weights, [*fused, x], strict=True)))
        x = x.reshape(b, GROUPS, 1 + length // GROUPS, dim)
        return x[:, :, 1:], x[:, :, 0]

    def decode(self, latents: Tensor, heads: Tensor, fill: Tensor, order: Tensor, h: int, w: int) -> Tensor:
        """Run the ``G`` masked passes in one batch and keep pass ``g``'s predictions of group ``g``.

        Args:
            latents: (B, G, L/G, D) encoder latents of each group (group-major, see :meth:`encode`).
            heads: (B, G, D) class tokens of the group encodings.
            fill: (B, G, L/G, D') decoder-space tokens for the slots of the hidden group.
            order: (B, L) the partition.
        Returns:
            (B, L, p*p*C) patch predictions in row-major order.
        """
        b, groups, n, _ = latents.shape
        dec = self.config.decoder_dim
        hide = torch.eye(groups, dtype=torch.bool, device=latents.device).view(1, groups, groups, 1, 1)
        tokens = torch.where(hide, fill.unsqueeze(1), self.decoder_embed(latents).unsqueeze(1))  # (B, pass, G, n, D')
        restore = torch.argsort(order, dim=1)
        tokens = tokens.reshape(b, groups, groups * n, dec)
        tokens = torch.gather(tokens, 2, restore.view(b, 1, -1, 1).expand(-1, groups, -1, dec))
        tokens = tokens + build_sincos2d_pos_embed([h, w], dec, device=tokens.device, dtype=tokens.dtype)
        others = torch.tensor([[j for j in range(groups) if j != i] for i in range(groups)], device=heads.device)
        head = self.decoder_head(heads[:, others].flatten(2))  # (B, pass, D'), from the other groups only
        x = torch.cat([head.unsqueeze(2), tokens], dim=2).reshape(b * groups, 1 + groups * n, dec)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x[:, 1:])).reshape(b, groups, groups * n, -1)
        own_pass = (restore // n).view(b, 1, -1, 1).expand(-1, 1, -1, pred.shape[-1])
        return torch.gather(pred, 1, own_pass).squeeze(1)

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        image_t: int = 400,
        feature_t: int = 600,
        train: bool = False,
    ) -> Tensor:
        """Reconstruct images (B, C, H, W) in [0, 1]; see the class doc.

        ``train=True`` uses a random partition and noise levels drawn per sample from
        ``config.train_image_t`` and ``config.train_feature_t`` (fractions of T) instead of ``image_t`` /
        ``feature_t`` (steps).
        """
        record_nfe()
        b, _, height, width = x.shape
        h, w = self.grid(height, width)
        x = self.pad(x)
        if train:
            order = random_order(h, w, b, generator, x.device)
            steps = self.schedule.num_steps
            image_t = _uniform_t(self.config.train_image_t, steps, b, generator, x.device)
            feature_t = _uniform_t(self.config.train_feature_t, steps, b, generator, x.device)
        else:
            order = interleaved_order(h, w, b, x.device)
        noised = self.schedule.q_sample(x, image_t, randn_like(x, generator))
        latents, heads = self.encode(self.embed(torch.cat([x, noised])), order.repeat(2, 1))
        fill = self.decoder_embed(latents[b:]).flatten(0, 1)  # (B*G, n, D'): the noised image's latents
        feature_t = torch.as_tensor(feature_t, device=x.device).expand(b).repeat_interleave(GROUPS)
        noise = randn_like(fill.unflatten(0, (b, GROUPS)), generator).flatten(0, 1)  # batch first: per-sample draws
        fill = self.schedule.q_sample(fill, feature_t, noise).unflatten(0, (b, GROUPS))
        pred = self.decode(latents[:b], heads[:b], fill, order, h, w)
        out = self.conv_head(self.unpatchify(pred, h, w))
        return to_image_space(out[..., :height, :width])


_BLOCK_KEY = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.")


def load_deepened(network: MaskedReconstructor, state: dict[str, Tensor]) -> MaskedReconstructor:
    """Fill ``network`` with the weights ``state`` of a network of the same widths with at most as many encoder
    and decoder blocks; return it.

    The blocks ``state`` lacks (the last ones of each stack) start as the identity: their attention and MLP
    output projections are zero, so ``network`` computes exactly what the saved network did and training goes on
    from there (Net2Net's deepening). With equal depths this is a strict load. Missing weights other than
    whole trailing blocks, weights ``network`` has no place for and shapes that differ are errors.
    """
    own = network.state_dict()
    saved_depth = {stack: 0 for stack in ("blocks", "decoder_blocks")}
    for key in state:
        if match := _BLOCK_KEY.match(key):
            saved_depth[match[1]] = max(saved_depth[match[1]], int(match[2]) + 1)
    added = {key for key in own if (m := _BLOCK_KEY.match(key)) and int(m[2]) >= saved_depth[m[1]]}
    missing, unexpected = sorted(set(own) - set(state) - added), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"these weights do not fit a deepened copy of their network: missing {missing}, "
                         f"unexpected {unexpected} (only whole blocks may be added, at the end of a stack)")
    network.load_state_dict(state, strict=False)  # shapes are still checked
    for stack, depth in saved_depth.items():
        for block in getattr(network, stack)[depth:]:
            for projection in (block.attn.proj, block.mlp.fc2):
                nn.init.zeros_(projection.weight)
                nn.init.zeros_(projection.bias)
    return network
