import pickle
from copy import deepcopy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from purifytf.saliency import (
    StageFeatures,
    activation_saliency,
    find_stages,
    hooked_features,
    stage_saliency,
    threshold_mask,
    topk_mask,
)


def tiny_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_stage_saliency_is_energy_minmax_upsampled():
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0, 0, 0], a[0, 1, 0, 0], a[0, 1, 1, 1] = 3.0, -4.0, 1.0  # energies 25, 0, 0, 1
    s = stage_saliency(a, (2, 2))
    torch.testing.assert_close(s, torch.tensor([[[[1.0, 0.0], [0.0, 1 / 25]]]]))
    up = stage_saliency(a, (8, 8))
    assert up.shape == (1, 1, 8, 8) and up.min() == 0 and up.max() == 1
    assert torch.equal(stage_saliency(torch.ones(2, 3, 1, 1), (4, 4)), torch.zeros(2, 1, 4, 4))
    # constant before upsampling: bilinear rounding is not stretched into a pattern
    assert torch.equal(stage_saliency(torch.full((1, 7, 5, 7), 0.3), (32, 32)), torch.zeros(1, 1, 32, 32))


def test_stage_saliency_of_half_precision_features_does_not_overflow():
    features = torch.full((1, 512, 4, 4), 20.0, dtype=torch.float16)  # energy 204,800 > float16's 65,504
    features[0, :, 0, 0] = 30.0
    s = stage_saliency(features, (8, 8))
    assert torch.isfinite(s).all() and s.max() == 1 and s.min() == 0


def test_topk_ties_at_the_cut_go_to_the_lower_index():
    saliency = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1, 0.5, 0.0, 0.2]).view(1, 1, 2, 4)
    assert topk_mask(saliency, 0.375).flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # k = 3 of 8
    with pytest.raises(ValueError, match="fraction must lie in"):
        topk_mask(saliency, 1.5)


def test_activation_saliency_fuses_by_max():
    feats = [torch.rand(2, 3, 8, 8), torch.rand(2, 5, 4, 4)]
    fused = activation_saliency(feats, (8, 8))
    torch.testing.assert_close(fused, torch.maximum(stage_saliency(feats[0], (8, 8)), stage_saliency(feats[1], (8, 8))))


def test_masks_and_straight_through():
    s = torch.rand(2, 1, 10, 10, requires_grad=True)
    m = threshold_mask(s, 0.9)
    assert torch.equal(m.detach(), (s >= 0.9).float())
    m.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))
    top = topk_mask(s.detach(), 0.15)
    assert top.sum(dim=(1, 2, 3)).tolist() == [15.0, 15.0]
    for b in range(2):
        assert s[b][top[b].bool()].min() >= s[b][~top[b].bool()].max()
    assert not threshold_mask(s.detach()).requires_grad


def test_timm_model_uses_feature_api():
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    feats = StageFeatures(net)(torch.rand(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert hook_count(net) == 0


def test_torchvision_model_via_feature_extraction():
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    extractor = StageFeatures(net)
    feats = extractor(x)
    names = find_stages(net, x)
    assert names == ["relu", "layer1", "layer2", "layer3"]  # layer4 is 1x1 at this size
    assert hook_count(net) == 0
    torch.testing.assert_close(feats, hooked_features(net, x, names))


@pytest.mark.parametrize("make", [lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10),
                                  lambda: torchvision.models.resnet18(weights=None, num_classes=10)])
def test_copies_and_pickles_extract_with_their_own_model(make):
    """After a call (extractors cached), a deep copy uses its own model and a pickle round trip works."""
    torch.manual_seed(0)
    extractor, x = StageFeatures(make().eval()), torch.rand(2, 3, 32, 32)
    before = extractor(x)
    copy, unpickled = deepcopy(extractor), pickle.loads(pickle.dumps(extractor))
    with torch.no_grad():
        for p in extractor.model.parameters():
            p.add_(1.0)
    for other in (copy, unpickled):
        torch.testing.assert_close(other(x), before)
        assert other.model is not extractor.model
    assert not torch.allclose(extractor(x)[0], before[0])
    double = deepcopy(extractor)
    double.model.double()
    assert double(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("name, expected", [
    ("resnet50", ["layer1", "layer2", "layer3", "layer4"]),  # not the bottlenecks' bn1 before their stride
    ("mobilenet_v3_small", ["features.1", "features.3", "features.8", "features"]),
    ("inception_v3", ["Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"]),  # not one branch of Mixed_7a
])
def test_stages_are_whole_blocks_not_the_layers_before_a_stride(name, expected):
    """ALGORITHMS.md: ResNet stages are layer1..layer4. A block that is no pipeline (a bottleneck with its stride
    inside, parallel branches) counts whole; a pipeline (Sequential of blocks, conv-conv-pool) is opened up."""
    size = 299 if name == "inception_v3" else 96
    extra = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    net = getattr(torchvision.models, name)(weights=None, num_classes=10, **extra).eval()
    assert find_stages(net, torch.rand(1, 3, size, size)) == expected


def test_containers_without_a_map_of_their_own_are_opened():
    """A ModuleList of stages, or an encoder returning a dict, is looked into (it has no 4-D output to stand for)."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                                         nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))])

        def forward(self, x):
            for stage in self.stages:
                x = stage(x)
            return {"features": x}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = Encoder(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.encoder(x)["features"].mean((2, 3)))

    assert find_stages(Net(), torch.rand(1, 3, 16, 16)) == ["encoder.stages.0.1", "encoder.stages.1.1",
                                                            "encoder.stages.1"]


def test_small_cnn_stages_open_up_its_conv_conv_pool_pipelines():
    """The bundled classifier's stages (the study's saliency masks depend on them)."""
    from purifytf.models import AllConvNet, SmallCNN

    x = torch.rand(2, 1, 28, 28)
    assert find_stages(SmallCNN().eval(), x) == ["stage1.1", "stage2.1", "stage2"]
    assert find_stages(AllConvNet().eval(), x) == ["features.0", "features.2", "features"]


def test_wrapped_with_normalisation():
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    wrapped = nn.Sequential(v2.Normalize([0.5] * 3, [0.25] * 3), net)
    x = torch.rand(2, 3, 32, 32)
    feats = StageFeatures(wrapped)(x)
    torch.testing.assert_close(feats[-1], net.layer3(net.layer2(net.layer1(net.maxpool(
        net.relu(net.bn1(net.conv1((x - 0.5) / 0.25))))))))
    timm_net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    assert len(StageFeatures(nn.Sequential(v2.Normalize([0.5] * 3, [0.25] * 3), timm_net))(x)) == 4


def test_custom_module_names_and_callable():
    net = tiny_cnn()
    x = torch.rand(3, 3, 8, 8)
    assert find_stages(net, x) == ["1", "3"]
    auto = StageFeatures(net)(x)
    named = StageFeatures(net, stages=["1", "3"])(x)
    called = StageFeatures(net, stages=lambda x: [net[:2](x), net[:4](x)])(x)
    torch.testing.assert_close(auto, named)
    torch.testing.assert_close(auto, called)
    assert hook_count(net) == 0


def test_a_shared_activation_module_is_not_taken_for_every_stage():
    """One nn.ReLU called after every conv: its hook sees only the last call, so it is no stage."""
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), relu, nn.Conv2d(4, 8, 3, stride=2, padding=1), relu,
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    x = torch.rand(2, 3, 8, 8)
    assert find_stages(net, x) == ["0", "2", "4"]
    assert [f.shape[-1] for f in StageFeatures(net)(x)] == [8, 4, 2]


def test_clear_errors():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(ValueError, match="could not find the feature maps of Sequential.*stages="):
        StageFeatures(mlp)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no submodule named"):
        StageFeatures(tiny_cnn(), stages=["layer9"])(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="returned no"):
        StageFeatures(tiny_cnn(), stages=["6"])(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="must be a non-empty list"):
        StageFeatures(mlp, stages=lambda x: [x.flatten(1)])(torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match="stages must be"):
        StageFeatures(mlp, stages=[])


def test_hooks_removed_when_forward_fails():
    net = tiny_cnn()
    with pytest.raises(RuntimeError):
        hooked_features(net, torch.rand(1, 5, 8, 8), ["1"])
    with pytest.raises(RuntimeError):
        find_stages(net, torch.rand(1, 5, 8, 8))
    assert hook_count(net) == 0
