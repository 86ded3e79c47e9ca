"""SSNI: how many score evaluations T' (``eps_steps``) keep the chosen noise level t stable, and what they cost.

For each T', SSNI (on DiffPurify, bundled Fashion-MNIST backbone) is calibrated on clean images
500-999 of the bundled test slice, then picks t for images 0-``--images`` (clean, and with Gaussian
noise of std 0.1 as off-manifold inputs) under three EPS noise seeds. Reported per T': the mean
spread (max - min over the seeds) of t per image, the mean |t - t_ref| against the largest T', and the
score-norm time over DiffPurify's own time (t* = 0.1, 100 steps) at the same batch, all in one run::

    python benchmarks/ssni_eps_steps.py --images 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from purifytf import SSNIPurify, pretrained
from purifytf.evaluation import load_dataset

RESULTS = Path(__file__).parent / "results"


def seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--eps-steps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 40])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_dataset("bundled:fashion-mnist").images
    calibration, x = images[500:], images[: args.images]
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    base = pretrained.diff_purify(pretrained=True)
    with torch.no_grad():
        base_seconds = seconds(lambda: base.purify(x, torch.Generator().manual_seed(0)))
        levels, rows = {}, []
        for steps in args.eps_steps:
            ssni = SSNIPurify(base, eps_steps=steps)
            ssni.calibrate(calibration, batch_size=250, generator=torch.Generator().manual_seed(1234))
            levels[steps] = torch.stack([torch.cat([ssni.noise_levels(batch, torch.Generator().manual_seed(s))
                                                    for batch in (x, noisy)]) for s in range(args.seeds)]).float()
            score_seconds = seconds(lambda s=ssni: s.score_norm(x, torch.Generator().manual_seed(0)))
            rows.append({"eps_steps": steps, "score_over_base": score_seconds / base_seconds})
        reference = levels[max(args.eps_steps)][0]
        for row in rows:
            t = levels[row["eps_steps"]]
            half = args.images
            row.update({"spread": (t.max(0).values - t.min(0).values).mean().item(),
                        "abs_diff_to_ref": (t - reference).abs().mean().item(),
                        "mean_t_clean": t[:, :half].mean().item(), "mean_t_noisy": t[:, half:].mean().item()})
            print(json.dumps(row), flush=True)
    results = {"images": args.images, "seeds": args.seeds, "reference_eps_steps": max(args.eps_steps),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "base": "DiffPurify t*=0.1, 100 DDPM steps", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ssni-eps-steps.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| T' | t spread over seeds | mean abs(t - t_ref) | mean t clean / noisy | score-norm time / base |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['eps_steps']} | {r['spread']:.2f} | {r['abs_diff_to_ref']:.2f} | {r['mean_t_clean']:.1f} / "
              f"{r['mean_t_noisy']:.1f} | {r['score_over_base']:.3f} |")


if __name__ == "__main__":
    main()
