"""Cost of one backbone architecture against another at equal NFE: the bare forward and DiffPurify per image.

Issue 16's speed budget: a new embedded backbone may cost at most 2x the previous one per purified image at
equal NFE. Both networks get random weights (timing only); their timings alternate call by call, so a load
change on the machine hits both sides alike, and the ratio is a median over those pairs::

    python benchmarks/backbone_ratio.py --threads 1                       # shipped vs the previous 0.64M UNet
    python benchmarks/backbone_ratio.py --baseline some/config.json --batches 1 16

Results go to ``benchmarks/results/backbone-ratio-<device>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from timing import seconds

from purifytf import DiffPurify
from purifytf.diffusion.backbones import build_backbone
from purifytf.hub import untrained_backbone

HERE = Path(__file__).parent
PREVIOUS = HERE / "configs" / "fashion-mnist-ddpm-0.64M.json"  # the embedded backbone before issue 16


def paired_ratio(candidate, baseline, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each callable and the median of their per-pair ratios, calls alternating."""
    candidate(), baseline()  # warm-up
    pairs = [(seconds(candidate, device), seconds(baseline, device)) for _ in range(repeats)]
    return {"candidate_s": statistics.median(c for c, _ in pairs), "baseline_s": statistics.median(b for _, b in pairs),
            "ratio": statistics.median(c / b for c, b in pairs)}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"candidate": untrained_backbone(args.candidate),
            "baseline": build_backbone(json.loads(Path(args.baseline).read_text()))}
    nets = {k: v.to(device).eval() for k, v in nets.items()}
    purifiers = {k: DiffPurify(v, t_star=0.1, steps=args.steps).to(device) for k, v in nets.items()}
    results = {"candidate": args.candidate, "baseline": str(args.baseline), "device": str(device),
               "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, torch {torch.__version__}",
               "parameters": {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()},
               "steps": args.steps, "repeats": args.repeats, "batches": {}}
    for batch in args.batches:
        x = torch.rand(batch, nets["candidate"].in_channels, *nets["candidate"].sample_size,
                       generator=torch.Generator().manual_seed(batch)).to(device)
        t = torch.full((batch,), 100, device=device)
        with torch.no_grad():
            forward = paired_ratio(*(lambda n=n, x=x, t=t: n(x, t) for n in nets.values()), args.repeats, device)
            purify = paired_ratio(*(lambda p=p, x=x: p.purify(x, torch.Generator(device).manual_seed(0))
                                    for p in purifiers.values()), args.repeats, device)
        results["batches"][str(batch)] = {"forward": forward, "diffpurify": purify}
    return results


def markdown(results: dict) -> str:
    params = results["parameters"]
    lines = [f"candidate `{results['candidate']}` ({params['candidate'] / 1e6:.2f}M parameters) against "
             f"`{Path(results['baseline']).name}` ({params['baseline'] / 1e6:.2f}M), {results['device']}, "
             f"{results['threads']} threads, {results['machine']}; DiffPurify t*=0.1, {results['steps']} steps "
             f"({results['steps']} NFE); medians of {results['repeats']} alternating pairs", "",
             "| batch | forward ms (candidate / baseline) | ratio | DiffPurify ms / image (candidate / baseline) "
             "| ratio |",
             "|---:|---|---:|---|---:|"]
    for batch, row in results["batches"].items():
        f, p, b = row["forward"], row["diffpurify"], int(batch)
        lines.append(f"| {batch} | {1e3 * f['candidate_s']:.2f} / {1e3 * f['baseline_s']:.2f} | {f['ratio']:.2f} | "
                     f"{1e3 * p['candidate_s'] / b:.2f} / {1e3 * p['baseline_s'] / b:.2f} | {p['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", default="fashion-mnist", help="registered weights whose architecture is timed")
    parser.add_argument("--baseline", type=Path, default=PREVIOUS, help="a backbone config.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--steps", type=int, default=10, help="DiffPurify reverse steps (= NFE)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    out = HERE / "results" / f"backbone-ratio-{args.device.split(':')[0]}{args.tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
