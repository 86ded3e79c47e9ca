"""Speed-up of ``torch.compile`` over eager on the embedded purifiers, and what compiling costs.

All numbers of a table come from one run, so the ratios hold on a noisy machine::

    python benchmarks/compile.py --threads 1                                   # CPU, inductor
    python benchmarks/compile.py --device cuda --batch 64 --autocast bf16 --channels-last   # GPU switches

For each purifier of :mod:`purifytf.pretrained` (weights ``--weights``, seeded, under ``torch.no_grad``):
eager time (median of ``--repeats`` calls after one warm-up), the first compiled call (compile time),
the compiled time (median of ``--repeats`` later calls), the speed-up eager / compiled, the graphs
dynamo made and whether a later call compiled anything (it should not), the largest difference from
eager's output under the same seed, and the NFE counted in the compiled calls. ``--target backbone``
compiles only the network (``module.compile()``: the sampler loop stays eager, one graph per shape).

Results: ``benchmarks/results/compile-<weights>-<device>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
from pathlib import Path

import torch
from timing import seconds
from torch._dynamo.utils import counters

from purifytf import pretrained
from purifytf.nfe import count_nfe

RESULTS = Path(__file__).parent / "results"
ENTRIES = {"DiffPurify": pretrained.diff_purify, "SaliencyDiffPurify": pretrained.saliency_diff_purify,
           "SSNIPurify": pretrained.ssni_purify, "IMPurify": pretrained.im_purify}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def network(purifier: torch.nn.Module) -> torch.nn.Module:
    """The network a purifier calls (SSNI: its base's backbone)."""
    purifier = getattr(purifier, "base", purifier)
    return purifier.network if hasattr(purifier, "network") else purifier.backbone


def measure(name: str, args, device: torch.device) -> dict:
    purifier = ENTRIES[name](pretrained=True, weights=args.weights, seed=0).to(device)
    size = purifier.sample_size or (args.image_size, args.image_size)  # IMPurify takes any size
    x = torch.rand(args.batch, purifier.in_channels, *size, generator=torch.Generator().manual_seed(0)).to(device)
    if args.channels_last:
        purifier = purifier.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = AUTOCAST[args.autocast]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        eager_out = purifier(x)
        eager = statistics.median(seconds(lambda: purifier(x), device) for _ in range(args.repeats))
        torch._dynamo.reset()
        counters.clear()
        if args.target == "backbone":
            network(purifier).compile(backend=args.backend)
            compiled = purifier
        else:
            compiled = torch.compile(purifier, backend=args.backend)
        compile_seconds = seconds(lambda: compiled(x), device)
        graphs = counters["stats"]["unique_graphs"]
        with count_nfe() as nfe:
            times = [seconds(lambda: compiled(x), device) for _ in range(args.repeats)]
        compiled_out = compiled(x)
    compiled_time = statistics.median(times)
    return {"purifier": name, "nfe": purifier.last_nfe, "nfe_counted": nfe.count / args.repeats,
            "eager_ms": 1e3 * eager, "compiled_ms": 1e3 * compiled_time, "speedup": eager / compiled_time,
            "compile_s": compile_seconds, "graphs": graphs, "recompiled": counters["stats"]["unique_graphs"] != graphs,
            "max_abs_diff": (compiled_out.float() - eager_out.float()).abs().max().item()}


TABLE_HEAD = ("| purifier | NFE | eager ms / batch | compiled ms / batch | speed-up | compile s | graphs "
              "| recompiles later | max abs diff vs eager |\n|---|---:|---:|---:|---:|---:|---:|---|---:|")


def table_row(r: dict) -> str:
    return (f"| {r['purifier']} | {r['nfe']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['compile_s']:.1f} | {r['graphs']} | {'yes' if r['recompiled'] else 'no'} | {r['max_abs_diff']:.1e} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="fashion-mnist")
    parser.add_argument("--purifiers", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=28, help="side of the images of size-agnostic purifiers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--target", choices=["purifier", "backbone"], default="purifier")
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="none")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"weights `{args.weights}`, batch {args.batch}, {device.type}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, backend {args.backend}, "
          f"target {args.target}, autocast {args.autocast}, channels_last {args.channels_last}\n", flush=True)
    print(TABLE_HEAD, flush=True)
    rows = []
    for name in args.purifiers:
        rows.append(measure(name, args, device))
        print(table_row(rows[-1]), flush=True)
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"compile-{args.weights}-{device.type}{'-' + args.target if args.target != 'purifier' else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
