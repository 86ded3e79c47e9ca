"""Networks trained by purifytf (as opposed to the pretrained backbones it wraps)."""

from .classifiers import AllConvNet, SmallCNN
from .mae import MAE_PRESETS, MAEConfig, MaskedReconstructor, build_reconstructor, load_deepened

__all__ = ["AllConvNet", "MAE_PRESETS", "MAEConfig", "MaskedReconstructor", "SmallCNN", "build_reconstructor",
           "load_deepened"]
