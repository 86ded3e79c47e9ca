"""The training loop every recipe shares: seeded batches, AdamW with warm-up + cosine, resumable checkpoints.

A recipe subclasses :class:`Trainer` and implements :meth:`Trainer.losses`. Randomness (batch order and
every draw of a step) comes from generators seeded by ``(seed, step)``; what a network draws from the global
RNG (dropout) continues from the state the checkpoint saved. So a run resumed from a checkpoint repeats the
uninterrupted run exactly. A checkpoint directory holds the model as :meth:`Trainer.save_model` writes it
(``config.json`` + ``model.safetensors``) plus ``training_state.pt`` (step, optimizer, scheduler, settings,
global RNG state, recipe extras; read with ``torch.load(weights_only=True)``), written last: it names the step
the weights were saved at, and a checkpoint whose two files disagree (a run killed while saving) is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..base import trainable

__all__ = ["STATE_FILE", "OptimConfig", "Trainer", "lr_factor", "step_generator"]

STATE_FILE = "training_state.pt"
_MAY_CHANGE_ON_RESUME = ("steps", "checkpoint_every", "num_workers")  # the horizon, asked for explicitly


@dataclasses.dataclass
class OptimConfig:
    """Optimisation settings shared by every recipe (defaults: MAE/IMPure's AdamW settings)."""

    steps: int = 1000
    batch_size: int = 64
    base_lr: float = 1e-4
    lr: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    checkpoint_every: int = 500
    num_workers: int = 0

    @property
    def learning_rate(self) -> float:
        """``lr``, or ``base_lr * batch_size / 256``."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of training step ``step``."""
    return torch.Generator().manual_seed(_seed(seed, 1, step))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Trainer:
    """Trains ``network`` (a part of ``model``, or all of it) on ``data`` with ``config``.

    Args:
        model: what a checkpoint saves (anything with ``save_pretrained``, or override :meth:`save_model`).
        network: the parameters optimised (weight decay skips biases and norms).
        data: map-style dataset of ``(image (C, H, W) in [0, 1], label)``.
        config: :class:`OptimConfig` (or a recipe's subclass).
    """

    desc = "train"

    def __init__(self, model: nn.Module, network: nn.Module, data: Dataset, config: OptimConfig):
        if len(data) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data)} training images")
        self.model = model
        self.network = network
        self.data = data
        self.config = config
        self.step = 0
        with trainable(network):  # a purifier's network is frozen (see Purifier): train it explicitly
            groups = param_groups_weight_decay(network, config.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps))
        self._resumed_rng: dict | None = None  # the global RNG state of a loaded checkpoint, set by fit

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
    def losses(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """The recipe's losses on a batch (B, C, H, W) in [0, 1] with labels (B,); summed for the step."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimiser step (e.g. an EMA update)."""

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns the losses."""
        generator = step_generator(self.config.seed, self.step)
        with trainable(self.network):
            losses = self.losses(images.to(self.device), labels.to(self.device), generator)
            self.optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.after_step()
        return {name: value.item() for name, value in losses.items()}

    def fit(self, out_dir: str | Path | None = None, stop: int | None = None, progress: bool = True,
            on_checkpoint: Callable[[], None] | None = None) -> list[dict[str, float]]:
        """Train from the current step to ``stop`` (default ``config.steps``), checkpointing to ``out_dir``.

        Checkpoints every ``config.checkpoint_every`` steps and at the end, calling ``on_checkpoint()`` after each
        (e.g. to log the sitting so far). Returns the losses per step.
        """
        stop = self.config.steps if stop is None else stop
        history = []
        batches = self.batches(self.step, stop)  # its loader draws a seed from the global RNG, as at step 0
        if self._resumed_rng is not None:
            _set_global_rng(self._resumed_rng)
            self._resumed_rng = None
        with tqdm(total=stop, initial=self.step, desc=self.desc, disable=not progress) as bar:
            for images, labels in batches:
                history.append(self.train_step(images, labels))
                bar.set_postfix({name: f"{value:.4f}" for name, value in history[-1].items()}, refresh=False)
                bar.update()
                if out_dir is not None and (self.step % self.config.checkpoint_every == 0 or self.step == stop):
                    self.save(out_dir)
                    if on_checkpoint is not None:
                        on_checkpoint()
        self.network.eval()
        return history

    # --- checkpoints ---------------------------------------------------------------------------
    def save_model(self, directory: Path) -> None:
        """Write the model (``config.json`` + ``model.safetensors``) to ``directory``."""
        self.model.save_pretrained(directory)

    def extra_state(self) -> dict[str, object]:
        """Recipe state beyond the optimiser's that resuming needs (tensors and plain values)."""
        return {}

    def recipe_settings(self) -> dict[str, object]:
        """The recipe's settings beyond ``config`` (plain values) that a resumed run must keep."""
        return {}

    def load_extra_state(self, state: dict[str, object]) -> None:
        """Restore :meth:`extra_state`."""

    def save(self, directory: str | Path) -> None:
        """Write the model and then ``training_state.pt`` (through a temporary file) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_model(directory)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "config": dataclasses.asdict(self.config), "recipe": self.recipe_settings(), "rng": _global_rng(),
                 "extra": self.extra_state(),
                 "weights_digest": _digest(directory / "model.safetensors")}
        torch.save(state, directory / f"{STATE_FILE}.tmp")
        os.replace(directory / f"{STATE_FILE}.tmp", directory / STATE_FILE)

    def load(self, directory: str | Path, adopt: tuple[str, ...] = ()) -> None:
        """Resume from a checkpoint of :meth:`save` (the model must have the same architecture).

        The settings must be the checkpoint's, but for the horizon ``steps`` (a longer or shorter run, asked for)
        and ``checkpoint_every``/``num_workers``; ``adopt`` names settings taken from the checkpoint instead
        (e.g. ``("steps",)``: a horizon its first sitting measured).
        """
        directory = Path(directory)
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        digest = _digest(directory / "model.safetensors")
        if state.get("weights_digest", digest) != digest:  # checkpoints saved before the digest was recorded lack it
            raise ValueError(f"{directory}: model.safetensors is not the one saved with step {state['step']} "
                             "(the run was stopped while saving), so the checkpoint cannot be resumed")
        self._adopt_config(state["config"], adopt, directory)
        _check_same(state.get("recipe", self.recipe_settings()), self.recipe_settings(), (), directory)
        safetensors.torch.load_model(self.model, directory / "model.safetensors", strict=True, device=str(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self._resumed_rng = state.get("rng")  # checkpoints saved before the RNG state was recorded lack it
        self.load_extra_state(state["extra"])

    def _adopt_config(self, saved: dict, adopt: tuple[str, ...], directory: Path) -> None:
        """Check the current settings against the checkpoint's ``saved`` ones, then take those ``adopt`` names."""
        _check_same(saved, dataclasses.asdict(self.config), (*adopt, *_MAY_CHANGE_ON_RESUME), directory)
        for name in adopt:
            setattr(self.config, name, saved[name])


def _check_same(saved: dict, current: dict, exempt: tuple[str, ...], directory: Path) -> None:
    """A ``ValueError`` listing the settings of ``current`` (but ``exempt``) that differ from the checkpoint's."""
    differ = {k: (saved.get(k), v) for k, v in current.items() if k not in exempt and _plain(saved.get(k)) != _plain(v)}
    if differ:
        listed = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"{directory}: a resumed run must keep the checkpoint's settings ({listed})")


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _global_rng() -> dict[str, object]:
    """The global RNG state (CPU, and every CUDA device when there is one): what dropout draws from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_global_rng(state: dict[str, object]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
