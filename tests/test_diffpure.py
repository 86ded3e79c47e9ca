"""DiffPurify against the exact oracle backbone."""

import pytest
import torch

from purifytf import DiffPurify, OracleBackbone, count_nfe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_reference_image_is_recovered_from_small_t(references, sampler):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.05, steps=10, sampler=sampler)
    out = purifier.purify(references, generator=gen())
    assert torch.allclose(out, references, atol=1e-4)


def test_far_noise_collapses_to_the_only_reference(references):
    one = references[:1]
    purifier = DiffPurify(OracleBackbone(one), t_star=0.9, steps=5)
    out = purifier.purify(torch.rand(3, 1, 8, 8, generator=gen(5)), generator=gen())
    assert torch.allclose(out, one.expand(3, -1, -1, -1), atol=1e-4)


def test_nfe_is_the_number_of_steps(references):
    purifier = DiffPurify(OracleBackbone(references))
    with count_nfe() as counter:
        purifier(references)
    assert purifier.last_nfe == counter.count == 100  # reference: t* = 0.1, every step
    purifier = DiffPurify(OracleBackbone(references), t_star=0.2, steps=8, sampler="ddim")
    purifier(references)
    assert purifier.last_nfe == 8 and purifier.num_steps == 8


def test_seeded_determinism(references):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.3, steps=5)
    x = torch.rand(2, 1, 8, 8, generator=gen(3))
    a, b = purifier.purify(x, generator=gen(1)), purifier.purify(x, generator=gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, purifier.purify(x, generator=gen(2)))
    seeded = DiffPurify(OracleBackbone(references), t_star=0.3, steps=5, seed=7)
    assert torch.equal(seeded(x), seeded(x))  # deterministic defence: no state accumulates
    torch.manual_seed(0)
    c = purifier(x)
    torch.manual_seed(0)
    assert torch.equal(c, purifier(x))  # unseeded: the global RNG


def test_train_and_eval_mode_agree(references):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.3, steps=5, seed=0)
    x = torch.rand(2, 1, 8, 8, generator=gen(3))
    out_eval = purifier.eval()(x)
    out_train = purifier.train()(x)
    assert purifier.training and not purifier.backbone.training
    assert torch.equal(out_eval, out_train)


def test_gradient_reaches_the_input_and_checkpointing_keeps_it(references):
    x = torch.rand(2, 1, 8, 8, generator=gen(3), requires_grad=True)
    grads = []
    for checkpoint in (False, True):
        purifier = DiffPurify(OracleBackbone(references), t_star=0.3, steps=4, seed=0, checkpoint=checkpoint)
        (grad,) = torch.autograd.grad(purifier(x).square().sum(), x)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gradient_matches_finite_differences(references):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.3, steps=3, sampler="ddim", seed=0).double()
    x = (torch.rand(1, 1, 8, 8, generator=gen(3), dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: purifier(inp), (x,), eps=1e-6, atol=1e-5)


def test_per_sample_levels(references):
    """Row i of a batch with per-sample scales equals row i of a batch run at scale i (same noise)."""
    purifier = DiffPurify(OracleBackbone(references), t_star=0.1, steps=5, sampler="ddim")
    x = references * 2 - 1
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert purifier.levels(purifier.reference_level, 4, scale, x.device).tolist() == [50, 100, 200, 400]
    together = purifier.denoise(x, gen(), level_scale=scale)
    for i in range(4):
        uniform = purifier.denoise(x, gen(), level_scale=scale[i].expand(4))
        assert torch.equal(together[i], uniform[i])
    alone_at_t_star = purifier.denoise(x, gen())
    assert torch.equal(alone_at_t_star[1], together[1])


def test_double_precision_and_half_keep_the_schedule_exact(references):
    purifier = DiffPurify(OracleBackbone(references), t_star=0.1, steps=2).double()
    out = purifier(references.double())
    assert out.dtype == torch.float64
    assert purifier.schedule._log_abar.dtype == torch.float64
    purifier.half()
    assert purifier.schedule._log_abar.dtype == torch.float64


def test_constructor_errors(references):
    backbone = OracleBackbone(references)
    with pytest.raises(ValueError, match="t_star"):
        DiffPurify(backbone, t_star=0)
    with pytest.raises(ValueError, match="sampler"):
        DiffPurify(backbone, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        DiffPurify(backbone, steps=0)
    with pytest.raises(TypeError, match="Backbone"):
        DiffPurify(torch.nn.Conv2d(1, 1, 3))
