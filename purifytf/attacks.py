"""White-box attacks on a :class:`~purifytf.DefendedModel`, by name.

An attack is ``METHOD[@VIEW]``. Methods: our PGD-EOT (summed cross-entropy over EOT fresh
purifications, exact gradients through purifier and classifier) in three flavours,

- ``pgd-eot-linf``: Linf ball, sign steps of ``step`` (Lee & Kim's attack);
- ``pgd-eot-l2``: L2 ball, steps of ``l2_step`` along the unit-L2 gradient (normalised-gradient PGD);
- ``pgd-eot-l2-sign``: L2 ball, sign steps of ``step`` (0.007) then L2 projection (Lee & Kim's L2 attack);

``autoattack-rand`` (AutoAttack's 'rand' version: APGD-CE then APGD-DLR with EOT, see :func:`apgd`) and
the nine attacks of IMPure (``fgsm pgd mifgsm difgsm mdifgsm apgd-ce apgd-dlr cw deepfool``, through
torchattacks; ``difgsm`` is DI2-FGSM, ``mdifgsm`` its momentum variant M-DI2-FGSM). Views: what the
attacker differentiates:

- ``adaptive`` (default): the whole defence, exact gradients;
- ``bpda``: the defence with the purifier's backward pass replaced by the identity (BPDA);
- ``transfer``: the bare classifier (the examples are then judged by the defence);
- ``surrogate``: the saliency paper's attacked model (Pei et al., ddp_test.py), a 2-call uniform-noise
  DDIM at the purifier's reference level on the same backbone (:func:`uniform_surrogate`): not adaptive.

Aliases: ``bpda-eot`` = ``pgd-eot-linf@bpda``; presets ``lee-kim`` (Linf), ``lee-kim-l2`` and ``impure``
(a preset takes a view too: ``impure@transfer``). Every attack takes images in [0, 1] and returns
adversarial images in [0, 1]; randomness comes from the global torch RNG (seed it per image or batch for
reproducible runs). A deterministic defence (no purifier, or a seeded one, whose per-sample noise streams
make every pass identical; :func:`is_deterministic`) is attacked with one pass per gradient: the exact
gradient of the function it computes, whatever ``eot`` says.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defended import DefendedModel
from .random import rand_like, randn_like

__all__ = ["Attack", "AttackSettings", "ATTACK_METHODS", "ATTACK_VIEWS", "PRESETS", "apgd", "eot_gradient",
           "is_deterministic", "parse_attacks", "pgd_eot", "uniform_surrogate"]

ATTACK_VIEWS = ("adaptive", "bpda", "transfer", "surrogate")


@dataclass(frozen=True)
class AttackSettings:
    """Threat model and budget (defaults: Lee & Kim's CIFAR-10 protocol).

    Attributes:
        eps, step: Linf radius and sign-step size (images in [0, 1]); ``step`` is also the sign step of
            ``pgd-eot-l2-sign``.
        steps: iterations of PGD-EOT and the FGSM family (CW and DeepFool keep torchattacks' 50).
        apgd_steps: iterations of APGD (``apgd-*``, ``autoattack-rand``; AutoAttack's 100).
        eot: fresh purifications per gradient of PGD-EOT and ``autoattack-rand``.
        eps_l2, step_l2: L2 radius and normalised-gradient step of ``pgd-eot-l2`` (``None``:
            ``2.5 * eps_l2 / steps``).
        random_start: PGD-EOT and ``pgd`` start at a random point of the ball (Lee & Kim start at ``x``).
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
        if self.eps > 1 or self.step > 1:
            raise ValueError(f"eps and step are in units of images in [0, 1], got eps={self.eps:g}, "
                             f"step={self.step:g} (8/255 is written 8/255)")
        for name in ("steps", "apgd_steps", "eot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eot_batch is not None and self.eot_batch < 1:
            raise ValueError(f"eot_batch must be >= 1, got {self.eot_batch}")

    @property
    def l2_step(self) -> float:
        return self.step_l2 if self.step_l2 is not None else 2.5 * self.eps_l2 / self.steps


def is_deterministic(model: nn.Module) -> bool:
    """Whether ``model`` says it computes a fixed function: a ``deterministic`` attribute that is true
    (:attr:`DefendedModel.deterministic`: no purifier, or a seeded one; or a wrapper passing it on)."""
    return getattr(model, "deterministic", False) is True


def eot_gradient(model: nn.Module, x: Tensor, y: Tensor, eot: int = 1, eot_batch: int | None = None) -> Tensor:
    """d/dx of the cross-entropy summed over the batch and ``eot`` fresh passes of ``model``.

    ``x`` (B, C, H, W), ``y`` (B,) -> gradient (B, C, H, W). The EOT samples run as one batch of
    ``eot * B`` (or chunks of ``eot_batch * B``). A deterministic model (:func:`is_deterministic`) runs
    one pass, scaled by ``eot``: the same sum, exactly the gradient of the function it computes.
    """
    passes = 1 if is_deterministic(model) else eot
    x = x.detach().requires_grad_(True)
    grad = torch.zeros_like(x)
    chunk = eot_batch or passes
    with torch.enable_grad():  # callers may run under no_grad (e.g. a training step's data preparation)
        for start in range(0, passes, chunk):
            copies = min(chunk, passes - start)
            logits = model(x.repeat(copies, 1, 1, 1))
            loss = F.cross_entropy(logits, y.repeat(copies), reduction="sum")
            grad += torch.autograd.grad(loss, x)[0]
    return grad if passes == eot else grad * eot


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
            sign: bool | None = None, random_start: bool = True, eot_batch: int | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """PGD with EOT in the ``norm`` ("Linf" or "L2") ball of radius ``eps`` around ``x`` in [0, 1].

    Each step ascends :func:`eot_gradient` by ``step`` along its sign (``sign=True``, the default for
    Linf; for L2 it is Lee & Kim's attack) or its unit-L2 direction (``sign=False``, the default for L2),
    projects back onto the ball and onto [0, 1]. Returns the last iterate (B, C, H, W), detached.
    """
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    sign = norm == "Linf" if sign is None else sign
    if norm == "Linf" and not sign:
        raise ValueError("Linf PGD steps along the gradient's sign (sign=False is for L2)")
    x = x.detach()
    delta = _random_start(x, norm, eps, generator) if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        grad = eot_gradient(model, x + delta, y, eot, eot_batch)
        ascent = grad.sign() if sign else grad / _per_sample_norm(grad)
        delta = _project(delta + step * ascent, norm, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def apgd(model: DefendedModel, x: Tensor, y: Tensor, *, losses: Sequence[str], eps: float, steps: int,
         eot: int = 1) -> Tensor:
    """torchattacks' Linf APGD once per loss (``"ce"``, ``"dlr"``), each run on the images the previous runs left.

    Against a stochastic, voting defence torchattacks' own ``APGD``/``MultiAttack`` go wrong in four ways, mended
    here: every image is attacked (torchattacks skips those whose single clean pass is wrong); each run returns its
    best-loss iterate per image (torchattacks returns the clean image unless one stochastic pass was fooled); the
    runs draw fresh purifier noise from the global RNG (torchattacks reseeds it on every run, replaying the same
    noise); and an image is left for the next run unless the vote (:meth:`DefendedModel.predict`) of ``model`` on it
    is wrong. ``model`` is the attacked view (:meth:`Attack.target`): the defence itself for the adaptive view; a
    transfer or surrogate view chains on its own model, as AutoAttack run on that model does (the defence only
    scores the final images). Images (B, C, H, W) in [0, 1] -> (B, C, H, W). The best loss is the one of the last
    EOT pass of each step, as in AutoAttack.
    """
    import torchattacks  # optional dependency

    adv = x.clone()
    left = torch.arange(len(x), device=x.device)
    eot = 1 if is_deterministic(model) else eot
    for loss in losses:
        run = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, loss=loss, eot_iter=eot)
        _, best = run.perturb(x[left], y[left], best_loss=True)  # best_loss: no reseeding, nothing skipped
        adv[left] = best.detach()
        left = left[model.predict(best) == y[left]]
        if not len(left):
            break
    return adv


def uniform_surrogate(purifier: nn.Module) -> nn.Module:
    """The saliency paper's attacked model for ``purifier``: a 2-call uniform-noise DDIM (DiffPurify) on its
    backbone at its reference level (Pei et al. attack a grid [t_l, t_l / 2, 0] where the mask has no effect)."""
    from .purifiers.diffpure import DiffPurify
    from .purifiers.diffusion import DiffusionPurifier

    if not isinstance(purifier, DiffusionPurifier):
        raise ValueError(f"the surrogate view needs a diffusion purifier, got {type(purifier).__name__}")
    t_star = purifier.reference_level / purifier.schedule.num_steps
    return DiffPurify(purifier.backbone, t_star=t_star, steps=2, sampler="ddim")


def _pgd(norm: str, sign: bool) -> Callable:
    def build(model: DefendedModel, s: AttackSettings) -> Callable:
        eps, step = (s.eps, s.step) if norm == "Linf" else (s.eps_l2, s.step if sign else s.l2_step)
        return lambda x, y: pgd_eot(model, x, y, norm=norm, eps=eps, step=step, steps=s.steps, eot=s.eot, sign=sign,
                                    random_start=s.random_start, eot_batch=s.eot_batch)
    return build


def _apgd(losses: tuple[str, ...], with_eot: bool) -> Callable:
    return lambda m, s: lambda x, y: apgd(m, x, y, losses=losses, eps=s.eps, steps=s.apgd_steps,
                                          eot=s.eot if with_eot else 1)


def _torchattacks(make: Callable) -> Callable:
    """A builder calling ``make(torchattacks, model, settings)`` (imported lazily: optional)."""
    def build(model: DefendedModel, settings: AttackSettings) -> Callable:
        import torchattacks

        return make(torchattacks, model, settings)
    return build


ATTACK_METHODS: dict[str, Callable] = {
    "pgd-eot-linf": _pgd("Linf", sign=True),
    "pgd-eot-l2": _pgd("L2", sign=False),
    "pgd-eot-l2-sign": _pgd("L2", sign=True),
    "autoattack-rand": _apgd(("ce", "dlr"), with_eot=True),  # torchattacks' AutoAttack(version="rand") fixes 10 steps
    "fgsm": _torchattacks(lambda ta, m, s: ta.FGSM(m, eps=s.eps)),
    "pgd": _torchattacks(lambda ta, m, s: ta.PGD(m, eps=s.eps, alpha=s.step, steps=s.steps,
                                                 random_start=s.random_start)),
    "mifgsm": _torchattacks(lambda ta, m, s: ta.MIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=1.0)),
    "difgsm": _torchattacks(lambda ta, m, s: ta.DIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=0.0)),
    "mdifgsm": _torchattacks(lambda ta, m, s: ta.DIFGSM(m, eps=s.eps, alpha=s.step, steps=s.steps, decay=1.0)),
    "apgd-ce": _apgd(("ce",), with_eot=False),
    "apgd-dlr": _apgd(("dlr",), with_eot=False),
    "cw": _torchattacks(lambda ta, m, s: ta.CW(m)),
    "deepfool": _torchattacks(lambda ta, m, s: ta.DeepFool(m)),
}
"""Method name -> ``build(model, settings)`` returning ``attack(x, y) -> x_adv``."""

ALIASES = {"bpda-eot": "pgd-eot-linf@bpda"}
PRESETS = {
    "lee-kim": ("pgd-eot-linf", "bpda-eot", "autoattack-rand"),  # the Linf threat model
    "lee-kim-l2": ("pgd-eot-l2-sign",),
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

    @property
    def library(self) -> str | None:
        """The optional package the method runs on (``"torchattacks"``: APGD, AutoAttack, the FGSM family, CW,
        DeepFool), or ``None`` (PGD-EOT)."""
        return None if self.method.startswith("pgd-eot") else "torchattacks"

    def check_available(self) -> None:
        """A ``ValueError`` with the install command if :attr:`library` is missing (before any image is attacked)."""
        missing = [m for m in (self.library, "scipy") if self.library and importlib.util.find_spec(m) is None]
        if missing:  # torchattacks imports scipy on import
            raise ValueError(f"attack {self.name} needs {' and '.join(missing)}, not installed: "
                             "pip install --no-deps 'torchattacks>=3.5' scipy (its requests pin is for downloads "
                             "only)")

    def target(self, defended: DefendedModel) -> DefendedModel:
        """The model whose gradients the attacker follows."""
        if self.view == "bpda":
            return defended.replace(bpda=True)
        if self.view == "transfer":
            return defended.replace(purifier=None)
        if self.view == "surrogate":
            return defended.replace(purifier=uniform_surrogate(defended.purifier))
        return defended

    def __call__(self, defended: DefendedModel, x: Tensor, y: Tensor, settings: AttackSettings) -> Tensor:
        """Adversarial versions (B, C, H, W) in [0, 1] of ``x`` with labels ``y`` (B,)."""
        self.check_available()
        attack = ATTACK_METHODS[self.method](self.target(defended), settings)
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
