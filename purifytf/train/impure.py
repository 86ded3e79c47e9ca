"""The IMPure training recipe (Liu et al., arXiv 2311.15339) for :class:`purifytf.IMPurify`.

* Stage 1, ``"pretrain"``: masked reconstruction of clean images, L1 loss.
* Stage 2, ``"finetune"``: (adversarial or clean input, clean target) pairs, the adversarial
  examples made on the fly against the target classifier (:func:`pgd_attack` or any attack
  callable); L1 pixel loss plus a perceptual L1 (:class:`FeatureLoss`) between the features of
  ``x_in * (1 - M) + pred * M`` (:func:`patch_mix`) and of the clean image.

AdamW (0.9, 0.95), weight decay 0.05 (not on biases and norms), lr ``1e-4 * batch / 256`` with
linear warm-up then cosine decay. Checkpoints are directories loadable with
``IMPurify.from_pretrained`` (``config.json`` + ``model.safetensors``) plus
``training_state.pt`` (step, optimizer, scheduler; ``torch.load(weights_only=True)``).

Randomness (batch order, partitions, noise, PGD starts, mixes) is drawn from generators seeded by
``(seed, step)``: a run resumed from a checkpoint repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..attacks import pgd_eot
from ..purifiers.impure import IMPurify
from ..random import rand_like
from .data import NO_LABEL

__all__ = [
    "FeatureLoss",
    "IMPureTrainer",
    "TrainConfig",
    "patch_mix",
    "pgd_attack",
    "vgg19_bn_feature_loss",
]

STATE_FILE = "training_state.pt"
Attack = Callable[[Tensor, Tensor, torch.Generator], Tensor]
"""``attack(x, y, generator) -> x_adv``: images (B, C, H, W) in [0, 1], labels (B,)."""


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training stage (defaults: the paper's optimiser settings)."""

    stage: str = "pretrain"
    steps: int = 1000
    batch_size: int = 64
    base_lr: float = 1e-4
    lr: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    checkpoint_every: int = 500
    adv_fraction: float = 0.5
    attack_eps: float = 8 / 255
    attack_steps: int = 10
    num_workers: int = 0

    def __post_init__(self):
        if self.stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if not 0 <= self.adv_fraction <= 1:
            raise ValueError(f"adv_fraction must be in [0, 1], got {self.adv_fraction}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or ``base_lr * batch_size / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of training step ``step``."""
    return torch.Generator().manual_seed(_seed(seed, 1, step))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pgd_attack(classifier: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
               eps: float = 8 / 255, steps: int = 10) -> Tensor:
    """The recipe's attack: L-inf PGD (:func:`purifytf.attacks.pgd_eot`) with a random start drawn from
    ``generator`` and step ``2.5 * eps / steps`` -> x_adv in [0, 1]."""
    return pgd_eot(classifier, x, y, norm="Linf", eps=eps, step=2.5 * eps / steps, steps=steps, generator=generator)


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


class IMPureTrainer:
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

    def __init__(self, purifier: IMPurify, data: Dataset, config: TrainConfig, classifier: nn.Module | None = None,
                 attack: Attack | None = None, perceptual: FeatureLoss | None = None):
        if len(data) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data)} training images")
        if config.stage == "finetune" and config.adv_fraction > 0 and attack is None:
            if classifier is None:
                raise ValueError("fine-tuning on adversarial examples needs a classifier or an attack")
            attack = functools.partial(pgd_attack, classifier.eval(), eps=config.attack_eps,
                                       steps=config.attack_steps)
        self.purifier = purifier
        self.network = purifier.network
        self.data = data
        self.config = config
        self.classifier = classifier
        self.attack = attack
        self.perceptual = perceptual
        self.step = 0
        groups = param_groups_weight_decay(self.network, config.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, config.warmup_steps, config.steps))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    # --- data ----------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """The images of step ``step``: a seeded permutation per epoch, cut into full batches."""
        per_epoch = len(self.data) // self.config.batch_size
        epoch, k = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(_seed(self.config.seed, 0, epoch))
        perm = torch.randperm(len(self.data), generator=generator)
        return perm[k * self.config.batch_size: (k + 1) * self.config.batch_size].tolist()

    def batches(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = (self.batch_indices(step) for step in range(start, stop))
        return iter(DataLoader(self.data, batch_sampler=sampler, num_workers=self.config.num_workers))

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

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns the losses."""
        generator = _step_generator(self.config.seed, self.step)
        losses = self.losses(images.to(self.device), labels.to(self.device), generator)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {name: value.item() for name, value in losses.items()}

    def fit(self, out_dir: str | Path | None = None, stop: int | None = None,
            progress: bool = True) -> list[dict[str, float]]:
        """Train from the current step to ``stop`` (default ``config.steps``), checkpointing to ``out_dir``.

        Checkpoints every ``config.checkpoint_every`` steps and at the end. Returns the losses per step.
        """
        stop = self.config.steps if stop is None else stop
        history = []
        with tqdm(total=stop, initial=self.step, desc=f"impure {self.config.stage}", disable=not progress) as bar:
            for images, labels in self.batches(self.step, stop):
                history.append(self.train_step(images, labels))
                bar.set_postfix({name: f"{value:.4f}" for name, value in history[-1].items()}, refresh=False)
                bar.update()
                if out_dir is not None and (self.step % self.config.checkpoint_every == 0 or self.step == stop):
                    self.save(out_dir)
        return history

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``training_state.pt`` to ``directory``."""
        directory = Path(directory)
        self.purifier.save_pretrained(directory)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "config": dataclasses.asdict(self.config)}
        torch.save(state, directory / STATE_FILE)

    def load(self, directory: str | Path) -> None:
        """Resume from a checkpoint of :meth:`save` (the purifier must have the same architecture)."""
        directory = Path(directory)
        safetensors.torch.load_model(self.purifier, directory / "model.safetensors", strict=True,
                                     device=str(self.device))
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
