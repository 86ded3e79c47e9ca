"""Training recipes: ``purifytf train impure ...`` on the command line, or in Python::

    from purifytf import IMPurify
    from purifytf.train import IMPureTrainer, TrainConfig, open_data

    purifier = IMPurify(preset="tiny", in_channels=1)
    trainer = IMPureTrainer(purifier, open_data("train-images-idx3-ubyte"), TrainConfig(steps=2000))
    trainer.fit("runs/stage1")
"""

from ..data import ArrayData, ImageFolderData, open_data
from .impure import FeatureLoss, IMPureTrainer, TrainConfig, patch_mix, pgd_attack, vgg19_bn_feature_loss

__all__ = [
    "ArrayData",
    "FeatureLoss",
    "IMPureTrainer",
    "ImageFolderData",
    "TrainConfig",
    "open_data",
    "patch_mix",
    "pgd_attack",
    "vgg19_bn_feature_loss",
]
