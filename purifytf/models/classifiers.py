"""Small image classifiers trained by purifytf (the embedded Fashion-MNIST default's target model)."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import Pretrained

__all__ = ["AllConvNet", "SmallCNN"]


class _UnitRangeInput:
    """timm's ``pretrained_cfg`` of a network that takes images in [0, 1] as they are (mean 0, std 1), so
    ``DefendedModel(..., normalize="auto")`` and ``purifytf eval --normalize auto`` need no statistics."""

    pretrained_cfg = {"mean": (0.0,), "std": (1.0,)}


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallCNN(_UnitRangeInput, nn.Module, Pretrained, library_name="purifytf", license="apache-2.0",
               tags=["image-classification", "purifytf"]):
    """Two VGG-style stages (2 x conv3x3-BN-ReLU, max-pool) and a two-layer head.

    Args:
        in_channels: image channels.
        num_classes: logits.
        width: channels of the first stage (the second has ``2 * width``).
        image_size: input side (a multiple of 4); the head sees ``(image_size / 4)^2`` positions.
        hidden: units of the hidden head layer.

    Input (B, in_channels, image_size, image_size) in [0, 1]; output logits (B, num_classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 28,
                 hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.stage1 = nn.Sequential(_conv_block(in_channels, width), _conv_block(width, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_block(width, 2 * width), _conv_block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage2(self.stage1(x * 2 - 1)))


class AllConvNet(_UnitRangeInput, nn.Module, Pretrained, library_name="purifytf", license="apache-2.0",
                 tags=["image-classification", "purifytf"]):
    """All-convolutional: conv3x3-BN-ReLU layers (the 2nd and 4th of stride 2), global average pooling, one
    linear layer; no max pooling, no dense hidden layer. The held-out architecture: it checks that a purifier
    is not tuned to :class:`SmallCNN` (see :func:`purifytf.train.classifier.train_heldout_classifier`).

    Args:
        in_channels: image channels.
        num_classes: logits.
        widths: channels of the five layers.

    Input (B, in_channels, H, W) in [0, 1] (any size); output logits (B, num_classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 64, 128, 128)):
        super().__init__()
        strides = [2 if i in (1, 3) else 1 for i in range(len(widths))]
        self.features = nn.Sequential(*(_conv_block(c_in, c_out, stride) for c_in, c_out, stride
                                        in zip([in_channels, *widths[:-1]], widths, strides, strict=True)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
