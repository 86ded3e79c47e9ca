"""Networks trained by purifytf (as opposed to the pretrained backbones it wraps)."""

from .mae import MAE_PRESETS, MAEConfig, MaskedReconstructor, build_reconstructor

__all__ = ["MAE_PRESETS", "MAEConfig", "MaskedReconstructor", "build_reconstructor"]
