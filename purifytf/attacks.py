"""White-box attacks on a :class:`~purifytf.DefendedModel`, by name.

An attack is ``METHOD[@VIEW]``. Methods: our PGD-EOT (``pgd-eot-linf``, ``pgd-eot-l2``: summed
cross-entropy over EOT fresh purifications, exact gradients through purifier and classifier) and,
through torchattacks, ``autoattack-rand`` (AutoAttack's 'rand' version: APGD-CE then APGD-DLR, with
EOT) and the nine attacks of
IMPure (``fgsm pgd mifgsm difgsm mdifgsm apgd-ce apgd-dlr cw deepfool``; ``difgsm`` is DI2-FGSM,
``mdifgsm`` its momentum variant M-DI2-FGSM). Views: what the attacker differentiates:

- ``adaptive`` (default): the whole defence, exact gradients;
- ``bpda``: the defence with the purifier's backward pass replaced by the identity (BPDA);
- ``transfer``: the bare classifier (the examples are then judged by the defence).

Aliases: ``bpda-eot`` = ``pgd-eot-linf@bpda``; presets ``lee-kim`` and ``impure`` (a preset takes a
view too: ``impure@transfer``). Every attack takes images in [0, 1] and returns adversarial images
in [0, 1]; randomness comes from the global torch RNG (seed it per image for reproducible runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defended import DefendedModel
from .random import rand_like, randn_like

__all__ = ["Attack", "AttackSettings", "ATTACK_METHODS", "ATTACK_VIEWS", "PRESETS", "eot_gradient", "parse_attacks",
           "pgd_eot"]

ATTACK_VIEWS = ("adaptive", "bpda", "transfer")


@dataclass(frozen=True)
class AttackSettings:
    """Threat model and budget (defaults: Lee & Kim's CIFAR-10 protocol).

    Attributes:
        eps, step: Linf radius and step size (images in [0, 1]).
        steps: iterations of PGD-EOT and the FGSM family (CW and DeepFool keep torchattacks' 50).
        apgd_steps: iterations of APGD (``apgd-*``, ``autoattack-rand``; AutoAttack's 100).
        eot: fresh purifications per gradient of PGD-EOT and ``autoattack-rand``.
        eps_l2, step_l2: L2 radius and step (``None``: ``2.5 * eps_l2 / steps``).
        random_start: PGD-EOT and ``pgd`` start at a random point of the ball.
        eot_batch: EOT samples per backward pass (``None``: all at once); lower it to save memory.
    """

    eps: float = 8 / 255
    step: float = 0.007
    steps: int = 200
    apgd_steps: int = 100
    eot: int = 20
    eps_l2: float = 0.5
    step_l2: float | None = None
    random_start: bool = True
    eot_batch: int | None = None

    def __post_init__(self):
        for name in ("eps", "step", "eps_l2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "apgd_steps", "eot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eot_batch is not None and self.eot_batch < 1:
            raise ValueError(f"eot_batch must be >= 1, got {self.eot_batch}")

    @property
    def l2_step(self) -> float:
        return self.step_l2 if self.step_l2 is not None else 2.5 * self.eps_l2 / self.steps


def eot_gradient(model: nn.Module, x: Tensor, y: Tensor, eot: int = 1, eot_batch: int | None = None) -> Tensor:
    """d/dx of the cross-entropy summed over the batch and ``eot`` fresh passes of ``model``.

    ``x`` (B, C, H, W), ``y`` (B,) -> gradient (B, C, H, W). The EOT samples run as one batch of
    ``eot * B`` (or chunks of ``eot_batch * B``).
    """
    x = x.detach().requires_grad_(True)
    grad = torch.zeros_like(x)
    chunk = eot_batch or eot
    with torch.enable_grad():  # callers may run under no_grad (e.g. a training step's data preparation)
        for start in range(0, eot, chunk):
            copies = min(chunk, eot - start)
            logits = model(x.repeat(copies, 1, 1, 1))
            loss = F.cross_entropy(logits, y.repeat(copies), reduction="sum")
            grad += torch.autograd.grad(loss, x)[0]
    return grad


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def _random_start(x: Tensor, norm: str, eps: float, generator: torch.Generator | None) -> Tensor:
    if norm == "Linf":
        return (2 * rand_like(x, generator) - 1) * eps
    direction = randn_like(x, generator)
    radius = rand_like(x.new_empty(x.shape[0], *[1] * (x.dim() - 1)), generator) * eps
    return direction / _per_sample_norm(direction) * radius


def _project(delta: Tensor, norm: str, eps: float) -> Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1)


def pgd_eot(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps: float, step: float, steps: int, eot: int = 1,
            random_start: bool = True, eot_batch: int | None = None, generator: torch.Generator | None = None
            ) -> Tensor:
    """PGD with EOT in the ``norm`` ("Linf" or "L2") ball of radius ``eps`` around ``x`` in [0, 1].

    Each step ascends :func:`eot_gradient` (sign for Linf, unit L2 direction for L2), projects back
    onto the ball and onto [0, 1]. Returns the last iterate (B, C, H, W), detached.
    """
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    x = x.detach()
    delta = _random_start(x, norm, eps, generator) if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        grad = eot_gradient(model, x + delta, y, eot, eot_batch)
        ascent = grad.sign() if norm == "Linf" else grad / _per_sample_norm(grad)
        delta = _project(delta + step * ascent, norm, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _eot_for(model: DefendedModel, settings: AttackSettings) -> int:
    return settings.eot if model.purifier is not None else 1  # a bare classifier is deterministic


def _pgd_linf(model: DefendedModel, settings: AttackSettings, num_classes: int) -> Callable:
    return lambda x, y: pgd_eot(model, x, y, norm="Linf", eps=settings.eps, step=settings.step, steps=settings.steps,
                                eot=_eot_for(model, settings), random_start=settings.random_start,
                                eot_batch=settings.eot_batch)


def _pgd_l2(model: DefendedModel, settings: AttackSettings, num_classes: int) -> Callable:
    return lambda x, y: pgd_eot(model, x, y, norm="L2", eps=settings.eps_l2, step=settings.l2_step,
                                steps=settings.steps, eot=_eot_for(model, settings),
                                random_start=settings.random_start, eot_batch=settings.eot_batch)


def _seed() -> int:
    """A seed for torchattacks' own generators, drawn from the (per-image seeded) global RNG state."""
    return torch.initial_seed() % 2**31


def _torchattacks(make: Callable) -> Callable:
    """A builder calling ``make(torchattacks, model, settings, num_classes)`` (imported lazily: optional)."""
    def build(model: DefendedModel, settings: AttackSettings, num_classes: int) -> Callable:
        import torchattacks

        return make(torchattacks, model, settings, num_classes)
    return build


ATTACK_METHODS: dict[str, Callable] = {
    "pgd-eot-linf": _pgd_linf,
    "pgd-eot-l2": _pgd_l2,
    "autoattack-rand": _torchattacks(lambda ta, m, s, n: ta.MultiAttack([
        ta.APGD(m, norm="Linf", eps=s.eps, steps=s.apgd_steps, loss=loss, eot_iter=_eot_for(m, s), seed=_seed())
        for loss in ("ce", "dlr")])),  # torchattacks' AutoAttack(version="rand") fixes 10 steps
    "fgsm": _torchattacks(lambda ta, m, s, n: ta.FGSM(m, eps=s.eps)),
    "pgd": _torchattacks(lambda ta, m, s, n: ta.PGD(m, eps=s.eps, alpha=s.step, steps=s.steps,
                                                    random_start=s.random_start)),
    "mifgsm": _torchattacks(lambda ta, m, s, n: ta.MIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=1.0)),
    "difgsm": _torchattacks(lambda ta, m, s, n: ta.DIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=0.0)),
    "mdifgsm": _torchattacks(lambda ta, m, s, n: ta.DIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=1.0)),
    "apgd-ce": _torchattacks(lambda ta, m, s, n: ta.APGD(m, norm="Linf", eps=s.eps, steps=s.apgd_steps, loss="ce",
                                                         seed=_seed())),
    "apgd-dlr": _torchattacks(lambda ta, m, s, n: ta.APGD(m, norm="Linf", eps=s.eps, steps=s.apgd_steps, loss="dlr",
                                                          seed=_seed())),
    "cw": _torchattacks(lambda ta, m, s, n: ta.CW(m)),
    "deepfool": _torchattacks(lambda ta, m, s, n: ta.DeepFool(m)),
}
"""Method name -> ``build(model, settings, num_classes)`` returning ``attack(x, y) -> x_adv``."""

ALIASES = {"bpda-eot": "pgd-eot-linf@bpda"}
PRESETS = {
    "lee-kim": ("pgd-eot-linf", "bpda-eot", "autoattack-rand"),  # the Linf threat model; L2 apart
    "impure": ("fgsm", "pgd", "mifgsm", "difgsm", "mdifgsm", "apgd-ce", "apgd-dlr", "cw", "deepfool"),
}


@dataclass(frozen=True)
class Attack:
    """One attack method on one view of the defence (see the module doc)."""

    method: str
    view: str = "adaptive"

    def __post_init__(self):
        if self.method not in ATTACK_METHODS:
            raise ValueError(f"unknown attack {self.method!r}; known: {sorted(ATTACK_METHODS)}, aliases "
                             f"{sorted(ALIASES)}, presets {sorted(PRESETS)}")
        if self.view not in ATTACK_VIEWS:
            raise ValueError(f"unknown attack view {self.view!r} in {self.name!r}; known: {ATTACK_VIEWS}")

    @property
    def name(self) -> str:
        return self.method if self.view == "adaptive" else f"{self.method}@{self.view}"

    def target(self, defended: DefendedModel) -> DefendedModel:
        """The model whose gradients the attacker follows."""
        if self.view == "bpda":
            return defended.replace(bpda=True)
        if self.view == "transfer":
            return defended.replace(purifier=None)
        return defended

    def __call__(self, defended: DefendedModel, x: Tensor, y: Tensor, settings: AttackSettings,
                 num_classes: int) -> Tensor:
        """Adversarial versions (B, C, H, W) in [0, 1] of ``x`` with labels ``y`` (B,)."""
        attack = ATTACK_METHODS[self.method](self.target(defended), settings, num_classes)
        return attack(x, y).detach()


def parse_attacks(text: str) -> list[Attack]:
    """``"pgd-eot-linf,bpda-eot,impure@transfer"`` -> attacks in order, without repeats."""
    attacks: list[Attack] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        item = ALIASES.get(item, item)
        method, _, view = item.partition("@")
        methods = PRESETS.get(method, (method,))
        for name in methods:
            name, _, own_view = ALIASES.get(name, name).partition("@")
            attack = Attack(name, own_view or view or "adaptive")
            if attack not in attacks:
                attacks.append(attack)
    if not attacks:
        raise ValueError("no attack given; e.g. 'pgd-eot-linf,bpda-eot' (see purifytf.attacks)")
    return attacks
