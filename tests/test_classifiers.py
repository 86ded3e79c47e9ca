"""The one classifier loader of purifytf eval, purifytf train and the factory."""

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from purifytf.classifiers import fashion_mnist_cnn, load_classifier


def test_shipped_classifier():
    model = load_classifier("purifytf:fashion_mnist_cnn")
    x = torch.rand(2, 1, 28, 28)
    assert not model.training and torch.equal(model(x), fashion_mnist_cnn(pretrained=True)(x))
    with pytest.raises(ValueError, match="unknown shipped"):
        load_classifier("purifytf:nope")


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet10t", "resnet10t"])
def test_named_architectures_with_a_weights_file(spec, tmp_path):
    torch.manual_seed(0)
    net = (torchvision.models.resnet18(num_classes=3) if spec.startswith("torchvision")
           else timm.create_model("resnet10t", num_classes=3)).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = load_classifier(spec, tmp_path / "w.safetensors", num_classes=3)
    x = torch.rand(1, 3, 32, 32)
    assert not loaded.training and torch.equal(loaded(x), net(x))
    with pytest.raises(ValueError, match="random weights"):
        load_classifier(spec, num_classes=3)


def test_entry_points_and_errors():
    assert isinstance(load_classifier("purifytf.models:SmallCNN"), torch.nn.Module)
    with pytest.raises(ValueError, match="apply to timm and torchvision"):
        load_classifier("purifytf.models:SmallCNN", num_classes=3)
    with pytest.raises(ValueError, match="has no callable"):
        load_classifier("purifytf.models:Nope")
    with pytest.raises(ValueError, match="neither a timm model name"):
        load_classifier("not_a_model_name")
