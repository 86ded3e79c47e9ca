"""DefendedModel: normalisation sources, voting, BPDA and exact gradients through a purifier."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.transforms import v2

from purifytf import DiffPurify, OracleBackbone, SaliencyDiffPurify, SSNIPurify
from purifytf.attacks import eot_gradient
from purifytf.defended import DefendedModel, adapt_normalization, input_channels, resolve_normalization
from purifytf.models.classifiers import AllConvNet, SmallCNN


def _linear(pixels: int = 16, classes: int = 3, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def _ddim_purifier() -> DiffPurify:
    """Deterministic (DDIM, fixed seed) purifier whose output still depends smoothly on its input."""
    references = 0.5 + 0.05 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return DiffPurify(OracleBackbone(references), t_star=0.3, steps=4, sampler="ddim", seed=0)


class _ScriptedLogits(nn.Module):
    """Returns the given logits (K,) for every image, one set per call (for vote tests)."""

    def __init__(self, *logits):
        super().__init__()
        self.logits = [torch.tensor(v, dtype=torch.float32) for v in logits]
        self.calls = 0

    def forward(self, x):
        out = self.logits[self.calls % len(self.logits)].expand(x.shape[0], -1)
        self.calls += 1
        return out


def test_normalization_sources():
    timm_model = timm.create_model("test_resnet", num_classes=3)
    assert resolve_normalization(timm_model, "auto") == (tuple(timm_model.pretrained_cfg["mean"]),
                                                         tuple(timm_model.pretrained_cfg["std"]))
    assert resolve_normalization(nn.Identity(), ResNet18_Weights.IMAGENET1K_V1) == ((0.485, 0.456, 0.406),
                                                                                   (0.229, 0.224, 0.225))
    assert resolve_normalization(nn.Identity(), ([0.5], [0.25])) == ((0.5,), (0.25,))
    assert resolve_normalization(nn.Identity(), None) is None
    with pytest.raises(ValueError, match="pretrained_cfg"):
        resolve_normalization(nn.Identity(), "auto")
    for own in (SmallCNN(), AllConvNet()):  # purifytf's classifiers take [0, 1] as it is
        assert resolve_normalization(own, "auto") is None and DefendedModel(None, own).normalization is None
    with pytest.raises(ValueError, match="positive std"):
        resolve_normalization(nn.Identity(), ([0.5], [0.0]))


def test_forward_normalizes_after_purifying():
    classifier = _linear()
    model = DefendedModel(None, classifier, normalize=([0.5], [0.25]))
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(model(x), classifier((x - 0.5) / 0.25))


def test_votes():
    scripted = _ScriptedLogits([5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    x = torch.rand(2, 1, 4, 4)
    stochastic = nn.Identity()  # a purifier without a seed: every pass may differ
    assert DefendedModel(stochastic, scripted, runs=3, normalize=None).predict(x).tolist() == [1, 1]
    assert DefendedModel(stochastic, scripted, runs=3, vote="logits", normalize=None).predict(x).tolist() == [0, 0]


def test_a_deterministic_defence_predicts_in_one_pass():
    """A seeded purifier (or none) computes one function: the vote's other passes would repeat the first."""
    x = torch.rand(2, 1, 4, 4)
    for purifier in (_ddim_purifier(), None):
        scripted = _ScriptedLogits([5.0, 0.0, 0.0], [0.0, 1.0, 0.0])
        model = DefendedModel(purifier, scripted, runs=5, normalize=None)
        assert model.deterministic and model.passes == 1
        assert model.predict(x).tolist() == [0, 0] and scripted.calls == 1
    stochastic = DefendedModel(nn.Identity(), _linear(), runs=5, normalize=None)
    assert not stochastic.deterministic and stochastic.passes == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="runs"):
        DefendedModel(None, _linear(), runs=0, normalize=None)
    with pytest.raises(ValueError, match="vote"):
        DefendedModel(None, _linear(), vote="mean", normalize=None)
    with pytest.raises(TypeError, match="nn.Module"):
        DefendedModel(None, lambda x: x, normalize=None)
    with pytest.raises(ValueError, match="normalize"):
        DefendedModel(None, _linear(), normalize="imagenet")


def test_stays_in_eval_mode():
    model = DefendedModel(None, nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(16, 2)), normalize=None)
    model.train()
    assert model.training and not model.classifier.training


def test_bpda_gradient_is_the_classifiers_at_the_purified_point():
    model = DefendedModel(_ddim_purifier(), _linear(), normalize=([0.5], [0.5]))
    x, y = 0.2 + 0.6 * torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    bpda = model.replace(bpda=True)
    torch.testing.assert_close(bpda(x), model(x))
    purified = model.purifier(x).detach()
    expected = eot_gradient(model.replace(purifier=None), purified, y)
    torch.testing.assert_close(eot_gradient(bpda, x, y), expected)
    assert not torch.allclose(eot_gradient(model, x, y), expected)


def test_exact_gradient_through_purifier_matches_finite_differences():
    model = DefendedModel(_ddim_purifier(), _linear(scale=30.0), normalize=None)
    x = 0.2 + 0.6 * torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmin(-1)  # the least likely label: cross-entropy far from saturation
    grad = eot_gradient(model, x, y)
    assert grad.norm() > 1e-2
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    h = 3e-2
    with torch.no_grad():
        loss = [F.cross_entropy(model(x + s * h * direction), y, reduction="sum") for s in (1, -1)]
    finite_difference = (loss[0] - loss[1]) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), finite_difference, rtol=0.02, atol=0)


def test_predict_without_purifier_is_the_classifiers_argmax():
    classifier = _linear()
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(DefendedModel(None, classifier, runs=2, normalize=None).predict(x), classifier(x).argmax(-1))


def test_grey_timm_model_gets_one_normalisation_value_per_channel():
    """timm's in_chans=1 keeps the 3 ImageNet values in its pretrained_cfg: they become their means."""
    classifier = timm.create_model("resnet18", in_chans=1, num_classes=10, pretrained=False).eval()
    model = DefendedModel(None, classifier)
    mean, std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3
    assert [pytest.approx(v) for v in model.normalization] == [(mean,), (std,)]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier((x - mean) / std))


def test_normalisation_adaptation_rule():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert adapt_normalization(imagenet, 3) == imagenet
    assert adapt_normalization(imagenet, None) == imagenet
    assert adapt_normalization(((0.5,), (0.25,)), 3) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="3 values per statistic but the classifier takes 4 input channels"):
        DefendedModel(None, timm.create_model("resnet18", in_chans=4, num_classes=10), normalize=imagenet)


def test_purifier_and_classifier_channel_mismatch_names_both_counts():
    rgb = timm.create_model("resnet18", in_chans=3, num_classes=10)
    assert input_channels(rgb) == 3 and input_channels(_ddim_purifier()) == 1
    with pytest.raises(ValueError, match="purifier outputs 1-channel images but the classifier takes 3"):
        DefendedModel(_ddim_purifier(), rgb)
    to_rgb = nn.Sequential(v2.RGB(), v2.Normalize([0.5] * 3, [0.25] * 3), rgb)  # grey in, RGB to the network
    assert input_channels(to_rgb) is None and input_channels(nn.Sequential(v2.Normalize([0.5], [0.25]), rgb)) == 3
    assert input_channels(nn.Sequential(nn.Sequential(v2.RGB()), rgb)) is None  # a step that may change them
    defended = DefendedModel(_ddim_purifier(), to_rgb.eval(), normalize=None)
    assert defended(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_a_saliency_purifier_sharing_a_normalised_classifier_is_refused():
    """SaliencyDiffPurify calls its classifier on [0, 1] images: sharing one the defended model normalises
    first would read the saliency from unnormalised input; the Sequential(Normalize, net) form is accepted."""
    net = timm.create_model("resnet10t", in_chans=1, num_classes=10, pretrained=False).eval()
    references = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    purifier = SaliencyDiffPurify(OracleBackbone(references), net, t_l=0.2, t_s=0.1, resample_steps=1, spacing=50)
    with pytest.raises(ValueError, match=r"calls this classifier on \[0, 1\] images .* normalize=None"):
        DefendedModel(purifier, net)
    with pytest.raises(ValueError, match="for its saliency"):
        DefendedModel(SSNIPurify(purifier, stats=None), net)  # nested, e.g. under SSNI
    wrapped = nn.Sequential(v2.Normalize(*DefendedModel(None, net).normalization), net)
    purifier = SaliencyDiffPurify(OracleBackbone(references), wrapped, t_l=0.2, t_s=0.1, resample_steps=1, spacing=50)
    DefendedModel(purifier, wrapped, normalize=None)


def test_images_that_do_not_fit_the_normalisation_are_refused():
    model = DefendedModel(None, _linear(pixels=48), normalize=((0.5, 0.5), (0.2, 0.2)))  # channels unknown
    with pytest.raises(ValueError, match="images with 3 channels, but the normalisation has 2 values"):
        model(torch.rand(1, 3, 4, 4))


def test_grey_torchvision_model_with_its_weights_normalisation():
    import torchvision

    classifier = torchvision.models.resnet18(num_classes=10)
    classifier.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model = DefendedModel(None, classifier, normalize=ResNet18_Weights.IMAGENET1K_V1)
    assert [pytest.approx(v) for v in model.normalization] == [((0.485 + 0.456 + 0.406) / 3,),
                                                               ((0.229 + 0.224 + 0.225) / 3,)]
