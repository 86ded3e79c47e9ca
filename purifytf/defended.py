"""A purifier in front of a classifier: the defended model that attacks and evaluations see.

``DefendedModel(purifier, classifier)`` takes images in [0, 1], purifies them, normalises them
the way the classifier was trained and classifies them. :meth:`DefendedModel.forward` is one
differentiable stochastic path (what white-box attacks and torchattacks differentiate);
:meth:`DefendedModel.predict` is the defence's decision, a vote over ``runs`` fresh purifications.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import input_channels
from .functional import straight_through
from .inputs import check_choice

__all__ = ["DefendedModel", "adapt_normalization", "input_channels", "resolve_normalization"]

_VOTES = ("majority", "logits")

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def resolve_normalization(classifier: nn.Module, normalize) -> Normalization | None:
    """The (mean, std) the classifier expects, or ``None`` for inputs in [0, 1] as they are.

    ``normalize`` is ``"auto"`` (the timm model's ``pretrained_cfg``, via
    ``timm.data.resolve_model_data_config``), torchvision weights (``weights.transforms()``),
    an explicit ``(mean, std)`` pair, or ``None`` (no normalisation).
    """
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if normalize != "auto":
            raise ValueError(f"normalize must be 'auto', None, torchvision weights or (mean, std), got {normalize!r}")
        if not getattr(classifier, "pretrained_cfg", None):
            raise ValueError(f"cannot infer the normalisation of {type(classifier).__name__} (no timm pretrained_cfg): "
                             "pass normalize=(mean, std), torchvision weights, or None for inputs in [0, 1]")
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(classifier)
        mean, std = tuple(config["mean"]), tuple(config["std"])
        return None if set(mean) == {0} and set(std) == {1} else (mean, std)  # inputs in [0, 1] as they are
    if hasattr(normalize, "transforms"):
        preset = normalize.transforms()
        return tuple(preset.mean), tuple(preset.std)
    mean, std = normalize
    if len(mean) != len(std) or min(std) <= 0:
        raise ValueError(f"normalize needs a mean and a positive std per channel, got {normalize!r}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def adapt_normalization(normalization: Normalization | None, channels: int | None) -> Normalization | None:
    """One (mean, std) value per input channel.

    Rule: the values are kept when their count equals ``channels`` (or ``channels`` is unknown); for a
    grey model (``channels == 1``) the mean and std become the means of the given values (the 3 ImageNet
    values -> one, as timm's ``adapt_input_conv`` sums the RGB filters of a grey model); a single value is
    repeated for every channel. Any other mismatch raises a ``ValueError`` naming both counts.
    """
    if normalization is None or channels is None or len(normalization[0]) == channels:
        return normalization
    mean, std = normalization
    if channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    if len(mean) == 1:
        return mean * channels, std * channels
    raise ValueError(f"the normalisation has {len(mean)} values per statistic but the classifier takes {channels} "
                     f"input channels: pass normalize=(mean, std) with {channels} values each, or None")


class DefendedModel(nn.Module):
    """``classifier(normalize(purifier(x)))`` with the defence's voting and attack views.

    Args:
        purifier: a :class:`~purifytf.Purifier` (or any differentiable [0, 1] -> [0, 1] module);
            ``None`` means no defence.
        classifier: ``nn.Module`` mapping normalised (B, C, H, W) images to logits (B, K).
        runs: fresh purifications whose decisions are pooled by :meth:`predict`.
        vote: ``"majority"`` (most frequent label, ties to the smallest label) or ``"logits"``
            (argmax of the mean logits).
        normalize: see :func:`resolve_normalization`; default ``"auto"`` (timm models). Adapted to the
            classifier's input channels by :func:`adapt_normalization` (e.g. ImageNet's 3 values -> their
            means for a grey ``timm.create_model(..., in_chans=1)``).
        bpda: backward pass through the purifier as the identity (BPDA); the forward is unchanged.

    Like purifiers, the model stays in eval mode whatever ``train()`` says (no batch-norm updates
    while attacking).
    """

    def __init__(self, purifier: nn.Module | None, classifier: nn.Module, runs: int = 1, vote: str = "majority",
                 normalize="auto", bpda: bool = False):
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        check_choice("vote", vote, _VOTES)
        self.purifier = purifier
        self.classifier = classifier
        self.runs = runs
        self.vote = vote
        self.bpda = bpda
        channels = _check_channels(purifier, classifier)
        self.normalization = adapt_normalization(resolve_normalization(classifier, normalize), channels)
        _check_saliency_input(purifier, classifier, self.normalization)
        self.train(False)

    def train(self, mode: bool = True):
        """Sets the ``training`` flag only; wrapped networks stay in eval mode."""
        super().train(False)
        self.training = mode
        return self

    def replace(self, **changes) -> DefendedModel:
        """A view sharing the networks with some arguments changed, e.g. ``replace(purifier=None)``."""
        kwargs = dict(purifier=self.purifier, classifier=self.classifier, runs=self.runs, vote=self.vote,
                      normalize=self.normalization, bpda=self.bpda)
        return DefendedModel(**{**kwargs, **changes})

    def purify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> one purification of it (``x`` itself without a purifier)."""
        if self.purifier is None:
            return x
        purified = self.purifier(x)
        return straight_through(purified, x) if self.bpda else purified  # BPDA: identity backward

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] images -> the classifier's input space."""
        if self.normalization is None:
            return x
        if len(self.normalization[0]) not in (1, x.shape[-3]):
            raise ValueError(f"images with {x.shape[-3]} channels, but the normalisation has "
                             f"{len(self.normalization[0])} values per statistic")
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in self.normalization)
        return (x - mean) / std

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of one stochastic, differentiable pass on ``x`` (B, C, H, W) in [0, 1]."""
        return self.classifier(self.normalize(self.purify(x)))

    @property
    def deterministic(self) -> bool:
        """Whether every pass computes the same function: no purifier, or a seeded one (per-sample noise
        streams fixed by the seed, so each pass and each copy of an image gets the deployed noise)."""
        return self.purifier is None or getattr(self.purifier, "seed", None) is not None

    @property
    def passes(self) -> int:
        """Forward passes per :meth:`predict`: :attr:`runs`, or 1 when :attr:`deterministic` (the others
        would repeat it)."""
        return 1 if self.deterministic else self.runs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The defence's labels (B,): a vote over :attr:`passes` fresh purifications of ``x``."""
        logits = torch.stack([self(x) for _ in range(self.passes)])  # (passes, B, K)
        if self.vote == "logits":
            return logits.mean(0).argmax(-1)
        votes = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)  # (B, K)
        return votes.argmax(-1)

    def extra_repr(self) -> str:
        return f"runs={self.runs}, vote={self.vote!r}, normalization={self.normalization}, bpda={self.bpda}"


def _check_saliency_input(purifier: nn.Module | None, classifier: nn.Module,
                          normalization: Normalization | None) -> None:
    """A ``ValueError`` when a part of the purifier (SaliencyDiffPurify's ``classifier``) calls this very classifier
    on [0, 1] images while the defended model normalises before it: the saliency would read unnormalised input."""
    if purifier is None or normalization is None:
        return
    if any(getattr(m, "classifier", None) is classifier for m in purifier.modules()):
        raise ValueError(
            f"the purifier calls this classifier on [0, 1] images (for its saliency), but the defended model "
            f"normalises with mean/std {normalization} before it: give the purifier "
            f"nn.Sequential(v2.Normalize(mean, std), classifier) and the defended model that same Sequential with "
            f"normalize=None")


def _check_channels(purifier: nn.Module | None, classifier: nn.Module) -> int | None:
    """The classifier's input channels (else the purifier's); a ``ValueError`` if the two differ."""
    purifier_channels, classifier_channels = input_channels(purifier), input_channels(classifier)
    if None not in (purifier_channels, classifier_channels) and purifier_channels != classifier_channels:
        raise ValueError(f"the purifier outputs {purifier_channels}-channel images but the classifier takes "
                         f"{classifier_channels} input channels")
    return classifier_channels if classifier_channels is not None else purifier_channels
