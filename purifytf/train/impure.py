"""The IMPure training recipe (Liu et al., arXiv 2311.15339) for :class:`purifytf.IMPurify`.

* Stage 1, ``"pretrain"``: masked reconstruction of clean images, L1 loss.
* Stage 2, ``"finetune"``: (adversarial or clean input, clean target) pairs, the adversarial
  examples made on the fly against the target classifier (:func:`pgd_attack` or any attack
  callable; the paper's), or with ``attack_target="defence"`` against the classifier behind the
  purifier being trained (the evaluation's adaptive attack: exact gradients through the network at its
  inference noise; not in the paper); L1 pixel loss plus a perceptual L1 (:class:`FeatureLoss`)
  between the features of ``x_in * (1 - M) + pred * M`` (:func:`patch_mix`) and of the clean image.

AdamW (0.9, 0.95), weight decay 0.05 (not on biases and norms), lr ``1e-4 * batch / 256`` with
linear warm-up then cosine decay. Checkpoints are directories loadable with
``IMPurify.from_pretrained`` (``config.json`` + ``model.safetensors``) plus
``training_state.pt`` (step, optimizer, scheduler; ``torch.load(weights_only=True)``).

The loop (seeded batches and draws, bitwise resume) is :class:`purifytf.train.loop.Trainer`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..attacks import pgd_eot
from ..base import Purifier
from ..data import NO_LABEL
from ..inputs import check_choice
from ..purifiers.impure import IMPurify
from ..random import rand_like
from .loop import OptimConfig, Trainer

__all__ = [
    "ATTACK_TARGETS",
    "FeatureLoss",
    "IMPureTrainer",
    "STAGES",
    "TrainConfig",
    "patch_mix",
    "pgd_attack",
    "vgg19_bn_feature_loss",
]

STAGES = ("pretrain", "finetune")
"""The two stages: masked reconstruction of clean images, then (adversarial or clean input, clean target) pairs."""

ATTACK_TARGETS = ("classifier", "defence")
"""What stage 2's PGD attacks: the bare classifier (the paper's), or the classifier behind the purifier."""

Attack = Callable[[Tensor, Tensor, torch.Generator], Tensor]
"""``attack(x, y, generator) -> x_adv``: images (B, C, H, W) in [0, 1], labels (B,)."""


@dataclasses.dataclass
class TrainConfig(OptimConfig):
    """Hyper-parameters of one IMPure stage (optimiser defaults: the paper's)."""

    stage: str = "pretrain"
    adv_fraction: float = 0.5
    attack_eps: float = 8 / 255
    attack_steps: int = 10
    attack_target: str = "classifier"
    """``"classifier"``: PGD on the bare classifier (the paper's); ``"defence"``: through the purifier as well."""

    def __post_init__(self):
        check_choice("stage", self.stage, STAGES)
        check_choice("attack_target", self.attack_target, ATTACK_TARGETS)
        if not 0 <= self.adv_fraction <= 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {self.adv_fraction}")


def pgd_attack(classifier: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
               eps: float = 8 / 255, steps: int = 10, purifier: Purifier | None = None) -> Tensor:
    """The recipe's attack: L-inf PGD (:func:`purifytf.attacks.pgd_eot`) with a random start drawn from
    ``generator`` and step ``2.5 * eps / steps`` -> x_adv in [0, 1].

    With ``purifier``: PGD on ``classifier(purifier.purify(x, generator))``, one fresh draw of the purifier's
    noise per step, also from ``generator`` (the adaptive attack, exact gradients through the purifier).
    """
    def defended(z: Tensor) -> Tensor:
        return classifier(purifier.purify(z, generator))

    model = classifier if purifier is None else defended
    return pgd_eot(model, x, y, norm="Linf", eps=eps, step=2.5 * eps / steps, steps=steps, generator=generator)


def patch_mix(x_in: Tensor, pred: Tensor, patch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """``x_in * (1 - M) + pred * M``: a random ``1/k`` of the patches (``k`` in {2, 3, 4} per sample) from the input.

    Shapes: ``x_in``, ``pred`` (B, C, H, W); patches of ``patch_size`` (partial at the borders).
    """
    b, _, height, width = x_in.shape
    h, w = math.ceil(height / patch_size), math.ceil(width / patch_size)
    k = 2 + (rand_like(x_in.new_empty(b, 1), generator) * 3).long().clamp(max=2)
    ranks = torch.argsort(torch.argsort(rand_like(x_in.new_empty(b, h * w), generator), dim=1), dim=1)
    from_input = (ranks * k < h * w).view(b, 1, h, w).to(x_in.dtype)
    keep = F.interpolate(from_input, scale_factor=patch_size, mode="nearest")[..., :height, :width]
    return x_in * keep + pred * (1 - keep)


class FeatureLoss(nn.Module):
    """``sum_k w_k * mean|f_k(x) - f_k(target)|`` over named layers of a frozen network.

    Args:
        network: any module taking the images (put normalisation inside); frozen and set to eval.
        layers: ``{submodule name: weight}``; ``""`` is the network's output (e.g. a classifier's logits).
    """

    def __init__(self, network: nn.Module, layers: dict[str, float]):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.layers = dict(layers)
        for name in self.layers:
            network.get_submodule(name)  # raises on unknown names

    def features(self, x: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> the outputs of ``layers``, in order."""
        found: dict[str, Tensor] = {}

        def keep(name: str):
            return lambda module, args, out: found.__setitem__(name, out)

        hooks = [self.network.get_submodule(name).register_forward_hook(keep(name)) for name in self.layers]
        try:
            self.network(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [found[name] for name in self.layers]

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            reference = self.features(target)
        pairs = zip(self.layers.values(), self.features(x), reference, strict=True)
        return sum(w * F.l1_loss(f, r) for w, f, r in pairs)


def vgg19_bn_feature_loss(weights: str = "IMAGENET1K_V1") -> FeatureLoss:
    """The paper's perceptual loss for RGB ImageNet: VGG19-BN relu4_4 x30, relu5_4 x10, fc6 x10.

    The weights come from torchvision (its cache, or a download where the machine has a network).
    """
    vgg = torchvision.models.vgg19_bn(weights=weights)
    network = nn.Sequential(v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), vgg)
    return FeatureLoss(network, {"1.features.38": 30.0, "1.features.51": 10.0, "1.classifier.0": 10.0})


class IMPureTrainer(Trainer):
    """Trains ``purifier.network`` for one stage.

    Args:
        purifier: the :class:`IMPurify` to train (its weights change in place).
        data: map-style dataset of ``(image (C, H, W) in [0, 1], label)``, labels ``-1`` when unknown
            (fine-tuning then attacks the classifier's own predictions).
        config: :class:`TrainConfig`.
        classifier: target classifier on [0, 1] images (fine-tuning: attacked by PGD unless
            ``attack`` is given).
        attack: ``attack(x, y, generator) -> x_adv`` replacing PGD.
        perceptual: :class:`FeatureLoss` of fine-tuning (``None``: pixel loss only).
    """

    desc = "impure"

    def __init__(self, purifier: IMPurify, data: Dataset, config: TrainConfig, classifier: nn.Module | None = None,
                 attack: Attack | None = None, perceptual: FeatureLoss | None = None):
        if config.stage == "finetune" and config.adv_fraction > 0 and attack is None:
            if classifier is None:
                raise ValueError("fine-tuning on adversarial examples needs a classifier or an attack")
            attack = functools.partial(pgd_attack, classifier.eval(), eps=config.attack_eps, steps=config.attack_steps,
                                       purifier=purifier if config.attack_target == "defence" else None)
        super().__init__(purifier, purifier.network, data, config)
        self.purifier = purifier
        self.classifier = classifier
        self.attack = attack
        self.perceptual = perceptual

    def recipe_settings(self) -> dict[str, object]:
        """The perceptual loss's layers and weights (the classifier and attack themselves are not compared)."""
        return {"perceptual": None if self.perceptual is None else dict(self.perceptual.layers)}

    # --- optimisation --------------------------------------------------------------------------
    def losses(self, clean: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """The stage's losses on a clean batch (B, C, H, W) in [0, 1] with labels (B,)."""
        x_in = clean
        if self.config.stage == "finetune" and self.attack is not None:
            adversarial = self.attack(clean, self._labels(clean, labels), generator)
            use = rand_like(clean.new_empty(len(clean)), generator) < self.config.adv_fraction
            x_in = torch.where(use.view(-1, 1, 1, 1), adversarial, clean)
        pred = self.network(x_in, generator, train=True)
        losses = {"pixel": F.l1_loss(pred, clean)}
        if self.config.stage == "finetune" and self.perceptual is not None:
            mix = patch_mix(x_in, pred, self.network.config.patch_size, generator)
            losses["perceptual"] = self.perceptual(mix, clean)
        return losses

    def _labels(self, clean: Tensor, labels: Tensor) -> Tensor:
        """Dataset labels, the classifier's predictions where missing."""
        if bool((labels == NO_LABEL).any()):
            if self.classifier is None:
                raise ValueError("the data has no labels: pass the classifier to attack its predictions")
            with torch.no_grad():
                labels = torch.where(labels == NO_LABEL, self.classifier(clean).argmax(1), labels)
        return labels
