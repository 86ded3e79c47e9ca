"""Cost per purified image: NFE, seconds, images/s, overhead over the bare backbone, attack-step memory.

Every number of one backbone comes from one run, so the ratios hold on a noisy machine::

    python benchmarks/cost.py --backbone fashion-mnist --batches 1 16 128
    python benchmarks/cost.py --backbone ddpm-cifar10-32 --batches 1 16 --repeats 3   # random weights
    python benchmarks/cost.py --backbone guided-diffusion-256-uncond --device cuda --batches 1 16 \
        --autocast bf16 --channels-last --compile                                   # GPU options

Results go to ``benchmarks/results/cost-<backbone>-<device>.json`` and a markdown table on stdout.

- time: median of ``--repeats`` calls (after one warm-up) under ``torch.no_grad``; per image = / batch.
- overhead: purifier time / time spent inside the backbone's forward calls during that same call
  (forward hooks; NFE x the bare forward time, measured without drift), and against a separately
  timed bare forward. SaliencyDiffPurify's classifier pass (the saliency mask) is reported apart.
- memory of one full-gradient attack step (cross-entropy of the defended classifier, backward to the
  input), with and without gradient checkpointing. CUDA: peak allocated bytes. CPU: the bytes autograd
  keeps for the backward pass (unique storages seen by ``saved_tensors_hooks``) plus, when
  checkpointing, the largest recomputed segment (one backbone forward's saved bytes): an estimate
  of the activation peak, excluding the weights, reported against one backbone forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import sync
from torch import Tensor, nn

from purifytf import DiffPurify, SaliencyDiffPurify, SSNIPurify, count_nfe, create_purifier
from purifytf.classifiers import fashion_mnist_cnn
from purifytf.factory import defence_table, selects
from purifytf.hub import load_backbone, untrained_backbone

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    return timed_calls(fn, repeats, device, {})[0]


class Stopwatch:
    """Seconds spent inside ``module``'s forward calls while active (forward hooks; CUDA synchronised)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device, self.seconds = module, device, 0.0

    def __enter__(self):
        def start(*_):
            sync(self.device)
            self._start = time.perf_counter()

        def stop(*_):
            sync(self.device)
            self.seconds += time.perf_counter() - self._start

        self.seconds = 0.0
        self._hooks = [self.module.register_forward_pre_hook(start), self.module.register_forward_hook(stop)]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


def timed_calls(fn: Callable[[], object], repeats: int, device: torch.device,
                parts: dict[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """Median seconds of ``fn()`` and the seconds spent inside each of ``parts`` during that call."""
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        with contextlib.ExitStack() as stack:
            watches = {name: stack.enter_context(Stopwatch(module, device)) for name, module in parts.items()}
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            runs.append((time.perf_counter() - start, {name: w.seconds for name, w in watches.items()}))
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def seeded(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def saved_bytes(loss_fn: Callable[[], Tensor], weights: list[nn.Module]) -> int:
    """Bytes autograd saves for the backward of ``loss_fn()`` (unique storages, the ``weights``' excluded)."""
    excluded = {p.untyped_storage().data_ptr() for m in weights for p in [*m.parameters(), *m.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


def step_memory(loss_fn: Callable[[Tensor], Tensor], x: Tensor, weights: list[nn.Module]) -> int:
    """Activation bytes of ``loss_fn(x).backward()``: CUDA peak allocation, or the CPU saved-tensor estimate."""
    x = x.clone().requires_grad_(True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        loss_fn(x).backward()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    return saved_bytes(lambda: loss_fn(x), weights)


def optimise(backbone: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The GPU options: channels_last memory format and ``torch.compile`` of the network."""
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if args.compile:
        backbone.unet = torch.compile(backbone.unet)  # DiffusersUNet and GuidedDiffusionUNet both hold .unet
    return backbone


MEASURED = ("DiffPurify ref (t*=0.1, 100 steps)", "DiffPurify (t*=0.1, 10 steps)", "SaliencyDiffPurify",
            "SaliencyDiffPurify ref (spacing 2)", "SSNIPurify (on DiffPurify ref)", "IMPurify")
"""Rows of the shared defence table (:func:`purifytf.factory.defence_table`) this benchmark measures."""


def build(backbone_name: str, device: torch.device):
    """Backbone (bundled weights or random), a classifier and the purifier configurations to measure."""
    bundled = backbone_name == "fashion-mnist"
    if bundled:
        backbone, classifier = load_backbone("fashion-mnist"), fashion_mnist_cnn(pretrained=True)
        extra = {}
    else:
        torch.manual_seed(0)
        backbone = untrained_backbone(backbone_name)  # random weights: timing only
        classifier = nn.Sequential(nn.Conv2d(backbone.in_channels, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(64, 10)).eval()
        # placeholder statistics (SSNI's default eps_steps): timing only
        extra = {"stats": {"mean": 1.0, "std": 1.0, "min": 0.0, "max": 2.0, "count": 2, "eps_steps": 20}}
    channels = backbone.in_channels
    backbone, classifier = backbone.to(device).eval(), classifier.to(device).eval()
    impure = create_purifier("impure.fashion_mnist", pretrained=bundled,
                             **({} if bundled else {"in_channels": channels})).to(device)
    table = defence_table()

    def make(name: str, ck: bool) -> nn.Module:
        variant, settings = table[name]
        if variant.startswith("impure"):
            return impure
        own = {**settings, "checkpoint": ck, **(extra if variant.startswith("ssni") else {})}
        if "saliency" in variant:
            own["classifier"] = classifier
        return create_purifier(variant, pretrained=bundled, backbone=backbone, **own)

    configs: dict[str, Callable[[bool], nn.Module]] = {name: functools.partial(make, name) for name in MEASURED}
    return backbone, classifier, impure, channels, configs


def measure_purifier(make: Callable[[bool], nn.Module], x: Tensor, y: Tensor, backbone: nn.Module,
                     classifier: nn.Module, weights: list[nn.Module], t_fwd: float, bare_bytes: int | None,
                     repeats: int) -> dict:
    """One purifier configuration at one batch: NFE, time, overhead and (if ``bare_bytes``) memory.

    ``overhead``: call time / time inside the backbone's forward calls of that same call (exact, no
    drift between separate timings); ``overhead_vs_separate_forward``: call time / (NFE x ``t_fwd``).
    """
    device, batch = x.device, len(x)
    purifier = make(False).to(device)
    with torch.no_grad(), count_nfe() as counter:
        purifier.purify(x, seeded(device))
    with torch.no_grad():
        parts = {"backbone": backbone, "classifier": classifier}
        seconds, inside = timed_calls(lambda: purifier.purify(x, seeded(device)), repeats, device, parts)
        entry = {"nfe": counter.count, "seconds_per_image": seconds / batch, "images_per_s": batch / seconds}
        if isinstance(purifier, (DiffPurify, SaliencyDiffPurify, SSNIPurify)):  # IMPurify's network is not the backbone
            entry["overhead"] = seconds / inside["backbone"]
            entry["overhead_vs_separate_forward"] = seconds / (counter.count * t_fwd)
        if isinstance(purifier, SaliencyDiffPurify):
            entry["saliency_mask_s"] = inside["classifier"]
            entry["overhead_without_classifier"] = (seconds - inside["classifier"]) / inside["backbone"]
        if isinstance(purifier, SSNIPurify):
            t_score = median_seconds(lambda: purifier.score_norm(x), repeats, device)
            t_base = median_seconds(lambda: purifier.base.purify(x, seeded(device)), repeats, device)
            entry["score_norm_over_base"] = t_score / t_base
    if bare_bytes is not None:
        def attack_loss(z: Tensor, p: nn.Module = purifier) -> Tensor:
            return F.cross_entropy(classifier(p(z)), y)

        entry["attack_step_bytes"] = step_memory(attack_loss, x, weights)
        if isinstance(purifier, (DiffPurify, SaliencyDiffPurify, SSNIPurify)):
            stored = step_memory(functools.partial(attack_loss, p=make(True).to(device)), x, weights)
            # CPU: the saved bytes plus the one backbone segment recomputed at a time
            entry["attack_step_bytes_checkpointed"] = stored + (bare_bytes if device.type == "cpu" else 0)
            entry["checkpointed_over_backbone"] = entry["attack_step_bytes_checkpointed"] / bare_bytes
    return entry


def measure_batch(batch: int, backbone: nn.Module, classifier: nn.Module, channels: int, configs: dict,
                  weights: list[nn.Module], args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    x = torch.rand(batch, channels, *backbone.sample_size, generator=torch.Generator().manual_seed(batch)).to(device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    t = torch.full((batch,), 100, device=device)  # schedule step 100
    with torch.no_grad():
        t_fwd = median_seconds(lambda: backbone(x, t), args.repeats, device)
        t_cls = median_seconds(lambda: classifier(x), args.repeats, device)
    row = {"backbone_forward_s": t_fwd, "classifier_forward_s": t_cls, "purifiers": {}}
    bare = None
    if batch in args.memory_batches:
        bare = row["backbone_fwd_bwd_bytes"] = step_memory(lambda z: backbone(z, t).square().mean(), x, weights)
    for name, make in configs.items():
        if args.only and not any(selects(key, name) for key in args.only):
            continue
        entry = row["purifiers"][name] = measure_purifier(make, x, y, backbone, classifier, weights, t_fwd, bare,
                                                          args.repeats)
        print(f"batch {batch:4d}  {name:42s} " + "  ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()), flush=True)
    return row


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    backbone, classifier, impure, channels, configs = build(args.backbone, device)
    optimise(backbone, args)
    results = {"options": {k: getattr(args, k) for k in ("autocast", "channels_last", "compile")},
               "backbone": args.backbone, "device": str(device), "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "backbone_parameters": sum(p.numel() for p in backbone.parameters()), "batches": {}}
    weights = [backbone, classifier, impure]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for batch in args.batches:
            results["batches"][str(batch)] = measure_batch(batch, backbone, classifier, channels, configs, weights,
                                                           args)
    return results


def markdown(results: dict) -> str:
    lines = [f"backbone `{results['backbone']}` ({results['backbone_parameters'] / 1e6:.2f}M parameters), "
             f"{results['device']}, {results['machine']}", "",
             "| batch | purifier | NFE | ms / image | images / s | overhead | attack-step MiB (ckpt) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for batch, row in results["batches"].items():
        for name, e in row["purifiers"].items():
            overhead = f"{e['overhead']:.2f}" if "overhead" in e and "IMPurify" not in name else "-"
            if "overhead_without_classifier" in e:
                overhead += f" ({e['overhead_without_classifier']:.2f} w/o mask)"
            memory = f"{e['attack_step_bytes'] / 2**20:.1f}" if "attack_step_bytes" in e else "-"
            if "attack_step_bytes_checkpointed" in e:
                memory += (f" ({e['attack_step_bytes_checkpointed'] / 2**20:.1f}; "
                           f"{e['checkpointed_over_backbone']:.2f}x backbone)")
            lines.append(f"| {batch} | {name} | {e['nfe']} | {1000 * e['seconds_per_image']:.2f} | "
                         f"{e['images_per_s']:.1f} | {overhead} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="fashion-mnist", help="fashion-mnist (bundled) or a registry name")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--memory-batches", type=int, nargs="*", default=[16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="measure only these purifiers: a table name picks that one, "
                        "other text every name containing it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone network")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--markdown", type=Path, help="only print the table of this results file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    results = run(args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cost-{args.backbone}-{torch.device(args.device).type}{args.tag}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
