"""Where a classifier looks: activation saliency from its stage feature maps, no hand-named layers.

Saliency of an image (Pei et al. 2025): for each stage feature map ``a`` (B, C, h, w) take the
energy ``sum_c |a_c|^2``, upsample it bilinearly to the image size, min-max normalise it per
image, and fuse the stages by a pixelwise max. :class:`StageFeatures` finds the stages of any
classifier; :func:`activation_saliency`, :func:`threshold_mask` and :func:`topk_mask` are the
kernels. Nothing here leaves a hook on a model or writes a file.
"""

import collections
import functools
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import straight_through

__all__ = [
    "StageFeatures",
    "activation_saliency",
    "find_stages",
    "hooked_features",
    "stage_saliency",
    "threshold_mask",
    "topk_mask",
]

FeatureFn = Callable[[Tensor], Sequence[Tensor]]
"""``features(x) -> [(B, C_k, h_k, w_k), ...]``: a classifier's stage feature maps, shallow to deep."""


# --- kernels --------------------------------------------------------------------------------------
def stage_saliency(features: Tensor, size: Sequence[int]) -> Tensor:
    """(B, C, h, w) feature map -> (B, 1, H, W) energy ``sum_c |a_c|^2``, upsampled, min-max to [0, 1].

    The energy is summed in float32 at least (a float16 sum overflows). A map constant to 1e-6 of its largest
    energy (e.g. a 1x1 stage) normalises to zeros, decided before upsampling, whose rounding would otherwise
    be stretched to [0, 1].
    """
    energy = features.to(torch.promote_types(features.dtype, torch.float32)).abs().square().sum(1, keepdim=True)
    top = energy.flatten(1).amax(1)
    constant = (top - energy.flatten(1).amin(1)) <= 1e-6 * top  # (B,)
    if tuple(energy.shape[-2:]) != tuple(size):
        energy = F.interpolate(energy, size=tuple(size), mode="bilinear", align_corners=False)
    flat = energy.flatten(1)
    lo = flat.amin(1, keepdim=True)
    span = (flat.amax(1, keepdim=True) - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return torch.where(constant[:, None], 0.0, (flat - lo) / span).view_as(energy)


def activation_saliency(features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Stage feature maps -> fused saliency (B, 1, H, W) in [0, 1]: pixelwise max of :func:`stage_saliency`."""
    return torch.stack([stage_saliency(a, size) for a in features]).amax(0)


def threshold_mask(saliency: Tensor, threshold: float = 0.9) -> Tensor:
    """(B, 1, H, W) saliency in [0, 1] -> mask, 1 where ``saliency >= threshold`` (straight-through)."""
    return straight_through((saliency.detach() >= threshold).to(saliency.dtype), saliency)


def topk_mask(saliency: Tensor, fraction: float = 0.15) -> Tensor:
    """(B, 1, H, W) saliency -> mask, 1 on the ``int(fraction * H * W)`` most salient pixels of each image
    (ties at the cut go to the lower pixel index: a stable order, the same on every device)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    flat = saliency.detach().flatten(1)
    k = int(fraction * flat.shape[1])
    chosen = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    hard = torch.zeros_like(flat).scatter_(1, chosen, 1.0)
    return straight_through(hard.view_as(saliency), saliency)


# --- finding the stages ---------------------------------------------------------------------------
def _store(outputs: dict, name: str, module: nn.Module, args, output) -> None:
    outputs[name] = output


def hooked_features(model: nn.Module, x: Tensor, names: Sequence[str]) -> list[Tensor]:
    """Run ``model(x)`` and return the outputs of its submodules ``names`` (last call of each).

    The forward hooks live for this call only (removed in ``finally``).
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no submodule named {unknown}; "
                         f"names are those of model.named_modules()")
    outputs: dict[str, Tensor] = {}
    handles = [modules[name].register_forward_hook(functools.partial(_store, outputs, name)) for name in names]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if not (isinstance(outputs.get(name), Tensor) and outputs[name].dim() == 4)]
    if missing:
        raise ValueError(f"submodules {missing} of {type(model).__name__} returned no (B, C, h, w) feature map")
    return [outputs[name] for name in names]


def _record_map(records: list, state: dict, name: str, module: nn.Module, args, output) -> None:
    state["started"] = state["started"] or next(module.parameters(recurse=False), None) is not None
    if state["started"] and isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
        records.append((name, tuple(output.shape[-2:])))


def find_stages(model: nn.Module, x: Tensor, num_stages: int = 4) -> list[str]:
    """Names of the ``num_stages`` deepest stages of ``model`` for inputs like ``x`` (dry run, no gradient).

    A stage is the last module, in execution order, to return a 4-D map at a given spatial resolution
    (runs of equal, decreasing resolution). Modules are looked at from the top: a module whose children
    form a pipeline (outputs of non-increasing size, at least two sizes: ``nn.Sequential(conv, conv,
    pool)``, a ``features`` list of blocks) is opened up, any other block counts whole, so a bottleneck's
    layers before its stride (ResNet-50's ``layer2.0.bn1``) or one branch of an Inception block never
    stand for a stage: ResNet-50 gives ``layer1``..``layer4``. Maps of size 1x1, maps larger than the last
    stage (e.g. an adaptive pool upsampling), anything computed before the first module with parameters
    (input normalisation) and modules called more than once per forward (one ``nn.ReLU`` shared by several
    layers: a hook sees only its last call) are skipped. One map per resolution (a WideResNet gives its
    block groups and final ReLU at 32, 16, 8: three; pass ``stages=`` names for others). May return fewer
    names, or none.
    """
    records: list[tuple[str, tuple[int, int]]] = []
    record = functools.partial(_record_map, records, {"started": False})
    handles = [module.register_forward_hook(functools.partial(record, name))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    calls = collections.Counter(name for name, _ in records)
    sizes = {name: size for name, size in records if calls[name] == 1}
    order = {name: i for i, (name, _) in enumerate(records)}
    stages: list[tuple[str, tuple[int, int]]] = []
    for name in sorted(_stage_candidates(model, "", sizes, order), key=order.__getitem__):
        size = sizes[name]
        if stages and stages[-1][1] == size:
            stages[-1] = (name, size)
        elif not stages or size[0] * size[1] < stages[-1][1][0] * stages[-1][1][1]:
            stages.append((name, size))
    return [name for name, _ in stages[-num_stages:]]


def _stage_candidates(module: nn.Module, prefix: str, sizes: dict, order: dict) -> list[str]:
    """The submodules :func:`find_stages` chooses from: ``module``'s recorded children, and the children of
    those whose own children form a pipeline or that return no map themselves (an ``nn.ModuleList``, an encoder
    returning a dict), recursively."""
    names = []
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        areas = [sizes[k][0] * sizes[k][1] for k in sorted(
            (f"{name}.{c}" for c, _ in child.named_children() if f"{name}.{c}" in sizes), key=order.__getitem__)]
        if name not in sizes or (len(set(areas)) > 1 and all(a >= b for a, b in itertools.pairwise(areas))):
            names += _stage_candidates(child, f"{name}.", sizes, order)
        if name in sizes:
            names.append(name)
    return names


def _split_preprocessing(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``nn.Sequential(pre..., net)`` -> ``(Sequential(pre...), net)``; any other model -> ``(Identity, model)``."""
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return model[:-1], model[-1]
    return nn.Identity(), model


class StageFeatures:
    """The stage feature maps of a classifier: ``StageFeatures(model)(x) -> [(B, C_k, h_k, w_k), ...]``.

    Stages, shallow to deep, are found automatically unless given:

    - timm models: their feature API (``forward_intermediates``, the last ``num_stages`` entries
      of ``feature_info``);
    - torchvision models: :func:`torchvision.models.feature_extraction.create_feature_extractor` on
      the stages :func:`find_stages` picks;
    - any other ``nn.Module``: :func:`find_stages` and :func:`hooked_features`.

    ``nn.Sequential(preprocessing..., net)`` (e.g. input normalisation before a timm or torchvision
    net) is recognised. The stages found are cached per input shape (C, H, W); no hook outlives a call.

    Args:
        model: the classifier.
        stages: ``None`` (automatic), names of submodules (``model.named_modules()``), or a callable
            ``x -> feature maps``.
        num_stages: how many of the deepest stages the automatic search keeps.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str] | FeatureFn | None = None, num_stages: int = 4):
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if stages is not None and not callable(stages):
            stages = list(stages)
            if not stages or not all(isinstance(name, str) for name in stages):
                raise TypeError("stages must be None, a non-empty list of submodule names, "
                                "or a callable x -> feature maps")
        self.model = model
        self.stages = stages
        self.num_stages = num_stages
        self._extractors: dict[tuple[int, ...], FeatureFn] = {}

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the cached extractors: closures do not pickle, and a copy's
        extractors must run its own copy of the model (rebuilt on its first call)."""
        return {**self.__dict__, "_extractors": {}}

    def __call__(self, x: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> feature maps (B, C_k, h_k, w_k), shallow to deep."""
        features = list(self.stages(x) if callable(self.stages) else self._cached_extractor(x)(x))
        if not features or any(not isinstance(a, Tensor) or a.dim() != 4 or a.shape[0] != x.shape[0]
                               for a in features):
            raise ValueError(f"the stage features of {type(self.model).__name__} must be a non-empty list of "
                             f"(B={x.shape[0]}, C, h, w) tensors, got "
                             f"{[tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in features]}")
        return features

    @torch.compiler.disable  # a cache filled while tracing would make torch.compile guard on it and recompile
    def _cached_extractor(self, x: Tensor) -> FeatureFn:
        """The extractor for inputs shaped like ``x``, built on first use."""
        key = tuple(x.shape[1:])
        if key not in self._extractors:
            self._extractors[key] = self._extractor(x)
        return self._extractors[key]

    def _extractor(self, x: Tensor) -> FeatureFn:
        if self.stages is not None:
            return functools.partial(hooked_features, self.model, names=self.stages)
        pre, net = _split_preprocessing(self.model)
        if hasattr(net, "forward_intermediates") and getattr(net, "feature_info", None):
            indices = min(self.num_stages, len(net.feature_info))
            return lambda x: net.forward_intermediates(pre(x), indices=indices, intermediates_only=True)
        if type(net).__module__.startswith("torchvision.models."):
            return self._torchvision_extractor(pre, net, x)
        return functools.partial(hooked_features, self.model, names=self._find(self.model, x))

    def _find(self, model: nn.Module, x: Tensor) -> list[str]:
        names = find_stages(model, x, self.num_stages)
        if not names:
            raise ValueError(
                f"could not find the feature maps of {type(self.model).__name__}: no submodule returned a "
                f"(B, C, h, w) map larger than 1x1 for input {tuple(x.shape)}; pass stages=[submodule names] "
                "or stages=callable(x) -> feature maps")
        return names

    def _torchvision_extractor(self, pre: nn.Module, net: nn.Module, x: Tensor) -> FeatureFn:
        from torchvision.models.feature_extraction import create_feature_extractor

        names = self._find(net, pre(x))
        graph = create_feature_extractor(net, return_nodes={name: str(k) for k, name in enumerate(names)})

        def features(x: Tensor) -> list[Tensor]:
            if graph.training != net.training:
                graph.train(net.training)
            return list(graph(pre(x)).values())

        return features
