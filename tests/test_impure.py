"""IMPurify and its masked reconstruction network."""

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from purifytf import count_nfe
from purifytf.base import trainable
from purifytf.models.mae import (
    GROUPS,
    MAE_PRESETS,
    _uniform_t,
    build_reconstructor,
    interleaved_order,
    load_deepened,
    random_order,
)
from purifytf.purifiers.impure import IMPurify

SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "fuse_indices": [0], "decoder_dim": 32, "decoder_depth": 1,
         "decoder_heads": 2}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small(in_channels=1, overrides=None, **kwargs) -> IMPurify:
    torch.manual_seed(0)
    return IMPurify(in_channels=in_channels, overrides={**SMALL, **(overrides or {})}, **kwargs)


def group_masks(h, w, p) -> torch.Tensor:
    """(G, h*p, w*p) bool: the pixels of each interleaved group."""
    order = interleaved_order(h, w, 1)[0]
    labels = torch.empty(h * w, dtype=torch.long)
    labels[order] = torch.arange(h * w) // (h * w // GROUPS)
    pixels = labels.view(h, w).repeat_interleave(p, 0).repeat_interleave(p, 1)
    return torch.stack([pixels == g for g in range(GROUPS)])


def test_partitions_are_four_equal_groups():
    order = interleaved_order(4, 6, 2)
    assert torch.equal(order.sort(1).values, torch.arange(24).expand(2, -1))
    for g, first in enumerate([0, 1, 6, 7]):  # (row % 2, col % 2) = (0, 0), (0, 1), (1, 0), (1, 1)
        assert order[0, g * 6] == first
    rand = random_order(4, 6, 3, gen())
    assert torch.equal(rand.sort(1).values, torch.arange(24).expand(3, -1))
    assert not torch.equal(rand[0], rand[1])


@pytest.mark.parametrize("size", [16, 14, 11])
def test_each_patch_is_predicted_once_from_a_pass_hiding_its_group(size):
    """Perturbing group g's input pixels changes only the predictions of the other groups, also where the image is
    padded to the grid (a padded patch that copied the image would show a group its own pixels)."""
    net = small().network
    x = torch.rand(2, 1, size, size, generator=gen(1))
    h, w = net.grid(size, size)
    order = interleaved_order(h, w, 2)
    fill = torch.randn(2, GROUPS, h * w // GROUPS, net.config.decoder_dim, generator=gen(2))

    def predict(images):
        latents, heads = net.encode(net.embed(net.pad(images)), order)
        return net.unpatchify(net.decode(latents, heads, fill, order, h, w), h, w)[..., :size, :size]

    base = predict(x)
    masks = group_masks(h, w, net.config.patch_size)[:, :size, :size]
    for g in range(GROUPS):
        moved = predict(torch.where(masks[g], torch.rand(x.shape, generator=gen(3 + g)), x))
        change = (moved - base).abs()
        assert change[:, :, masks[g]].max() < 1e-5, f"group {g} saw its own input"
        for other in set(range(GROUPS)) - {g}:
            assert change[:, :, masks[other]].amax(-1).min() > 1e-3, f"group {other} ignored group {g}"


def test_hidden_group_sees_its_input_only_through_the_noise():
    """Full pipeline: at full noise a patch's interior output (away from the 3x3 head's reach) is its own group's
    business only through the noised copy, a ~1e-5 signal."""
    purifier = small(image_t=1.0, feature_t=1.0, seed=0)
    x = torch.rand(1, 1, 16, 16, generator=gen(1))
    interior = torch.zeros(16, 16, dtype=torch.bool)
    interior.view(4, 4, 4, 4)[:, 1:3, :, 1:3] = True
    base = purifier.network(x, gen(), 1000, 1000)
    masks = group_masks(4, 4, 4)
    for g in range(GROUPS):
        moved = purifier.network(torch.where(masks[g], 1 - x, x), gen(), 1000, 1000)
        change = (moved - base).abs()[0, 0]
        assert change[masks[g] & interior].max() < 1e-3
        assert change[~masks[g]].max() > 1e-2


@pytest.mark.parametrize("shape", [(1, 28, 28), (2, 1, 5, 7), (3, 1, 1, 1), (2, 2, 1, 33, 17)])
def test_any_size_grey(shape):
    purifier = small(seed=0)
    x = torch.rand(shape, generator=gen())
    with count_nfe() as counter:
        out = purifier(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert purifier.last_nfe == counter.count == 1


def test_rgb_image_tensor_and_float64():
    purifier = small(in_channels=3, seed=0)
    x = tv_tensors.Image(torch.rand(3, 30, 18, generator=gen(), dtype=torch.float64))
    image, label = v2.Compose([purifier])(x, 7)
    assert isinstance(image, tv_tensors.Image) and image.shape == x.shape and image.dtype == torch.float64
    assert label == 7


def test_save_pretrained_round_trip(tmp_path):
    purifier = small(in_channels=3, image_t=0.3, seed=4)
    purifier.save_pretrained(tmp_path)
    loaded = IMPurify.from_pretrained(tmp_path)
    assert loaded.network.config == purifier.network.config and loaded.image_t == 0.3 and loaded.seed == 4
    x = torch.rand(2, 3, 12, 12, generator=gen())
    assert torch.equal(loaded(x), purifier(x))
    assert loaded.state_dict().keys() == purifier.state_dict().keys()


def test_a_deepened_network_computes_what_the_saved_one_did():
    """Blocks added at the end of each stack start as the identity: the same outputs to the bit, and they train."""
    saved = small(in_channels=1).network
    with torch.no_grad():  # trained-looking weights: no zero projections anywhere
        for parameter in saved.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=gen(7)))
    deeper = small(in_channels=1, overrides={"depth": 3, "decoder_depth": 3}).network
    load_deepened(deeper, saved.state_dict())
    x = torch.rand(2, 1, 12, 12, generator=gen())
    for train in (False, True):
        assert torch.equal(deeper(x, gen(1), image_t=50, feature_t=100, train=train),
                           saved(x, gen(1), image_t=50, feature_t=100, train=train))
    with trainable(deeper):
        deeper(x, gen(1), image_t=50, feature_t=100).square().sum().backward()
    for block in (deeper.blocks[2], deeper.decoder_blocks[1], deeper.decoder_blocks[2]):
        assert block.attn.proj.weight.grad.abs().sum() > 0 and block.mlp.fc2.weight.grad.abs().sum() > 0
    same = small(in_channels=1).network
    assert torch.equal(load_deepened(same, saved.state_dict())(x, gen(1)), saved(x, gen(1)))  # equal depths


def test_deepening_refuses_what_is_not_whole_trailing_blocks():
    state = small(in_channels=1, overrides={"decoder_depth": 2}).network.state_dict()
    shallower = small(in_channels=1).network
    with pytest.raises(ValueError, match="unexpected.*decoder_blocks.1"):
        load_deepened(shallower, state)  # fewer blocks than the weights
    gap = {k: v for k, v in state.items() if not k.startswith("decoder_blocks.0.")}
    with pytest.raises(ValueError, match="missing.*decoder_blocks.0"):
        load_deepened(small(in_channels=1, overrides={"decoder_depth": 2}).network, gap)
    with pytest.raises(ValueError, match="missing.*conv_head"):
        load_deepened(shallower, {k: v for k, v in state.items()
                                  if not k.startswith(("conv_head", "decoder_blocks.1"))})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_deepened(small(in_channels=1, overrides={"decoder_dim": 64, "decoder_depth": 2}).network, state)


def test_seeded_determinism():
    purifier = small()
    x = torch.rand(2, 1, 12, 12, generator=gen())
    a, b = purifier.purify(x, gen(1)), purifier.purify(x, gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, purifier.purify(x, gen(2)))
    seeded = small(seed=3)
    assert torch.equal(seeded(x), seeded(x))


def test_gradient_reaches_the_input():
    x = torch.rand(2, 1, 10, 10, generator=gen()).requires_grad_(True)
    small().purify(x, gen()).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_are_exact():
    """Autograd matches finite differences through the whole purifier (float64, fixed noise draws)."""
    purifier = small(seed=0).double()
    x = (0.1 + 0.8 * torch.rand(1, 1, 8, 8, generator=gen(), dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda images: purifier.purify(images, gen(1)), (x,), eps=1e-6, atol=1e-6)


def test_bad_inputs_and_arguments():
    purifier = small()
    with pytest.raises(ValueError, match="1-channel"):
        purifier(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        purifier(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        purifier(torch.full((1, 8, 8), 2.0))
    with pytest.raises(ValueError, match="unknown preset"):
        IMPurify(preset="huge")
    with pytest.raises(ValueError, match="feature_t"):
        IMPurify(feature_t=1.01)
    with pytest.raises(ValueError, match="fuse_indices"):
        build_reconstructor("tiny", fuse_indices=[3])
    for bad in ([0.5, 0.5], [0.2, 1.2], [-0.1, 0.3]):
        with pytest.raises(ValueError, match="train_image_t must be fractions of T"):
            build_reconstructor("tiny", train_image_t=bad)


def test_training_noise_levels_come_from_the_configured_ranges():
    t = _uniform_t((0.05, 0.3), 1000, 20000, gen(), None)
    assert t.dtype == torch.long and t.min() == 50 and t.max() == 299
    assert torch.bincount(t - 50).min() > 0  # every level of the range is drawn
    assert torch.equal(_uniform_t((0.2, 1.0), 1000, 5, gen(), None), _uniform_t((0.2, 1.0), 1000, 5, gen(), None))


def test_training_ranges_travel_with_the_weights(tmp_path):
    purifier = small(overrides={"train_image_t": [0.0, 0.3], "train_feature_t": [0.1, 0.6]})
    purifier.save_pretrained(tmp_path)
    config = IMPurify.from_pretrained(tmp_path).network.config
    assert (config.train_image_t, config.train_feature_t) == ((0.0, 0.3), (0.1, 0.6))
    assert MAE_PRESETS["base"].train_image_t == (0.2, 0.6) and MAE_PRESETS["base"].train_feature_t == (0.2, 1.0)


def test_presets_have_the_documented_sizes():
    tiny = build_reconstructor("tiny", 1).config
    assert (tiny.patch_size, tiny.embed_dim, tiny.depth) == (4, 128, 4)
    base = MAE_PRESETS["base"]
    assert (base.patch_size, base.embed_dim, base.depth, base.decoder_dim, base.decoder_depth) == (16, 768, 12, 512, 8)
    assert base.fuse_indices == (0, 2, 4, 6, 8)
