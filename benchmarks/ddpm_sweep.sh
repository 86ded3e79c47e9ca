#!/bin/bash
# DDPM variants for the embedded Fashion-MNIST backbone (issue 16), trained side by side on one GPU, each for about
# SECS seconds (--ddpm-seconds: the cosine horizon from the warm-up's speed), then measured by the recipe (PSNR on
# the 10,000 test images, DiffPurify on the bundled slice). Writes $OUT/<variant>.tar (EMA weights, config,
# metrics), $OUT/summary.json and the resumable state of the best variant within the cost budget.
# As run on an H200 (2026-12-04; MODEL_CARD.md, "The embedded DDPM"):
#   mkdir -p .gpu/data .gpu/heldout && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/data/ \
#     && cp ~/.cache/purifytf/heldout/allconv-1500-0/* .gpu/heldout/ && SECS=330 OUT=out bash benchmarks/ddpm_sweep.sh
# (.whl: wheels of packages the machine lacks, installed to /tmp/site; LOCAL=1 PY=python DEVICE=cpu skips that.
# ONLY=PREFIX runs one variant; EXTRA adds recipe options to every variant.)
SECS=${SECS:-330}
[ -n "$LOCAL" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}
[ -n "$LOCAL" ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, diffusers, kornia, purifytf; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())" || exit 1
rm -rf .gpu/runs .gpu/ckpt; mkdir -p .gpu/runs .gpu/ckpt
COMMON="--part ddpm --data .gpu/data --device $DEVICE --threads 2 --heldout-cache .gpu/heldout --ddpm-seconds $SECS"
run() {  # name, options...
  local name=$1; shift
  [ -n "$ONLY" ] && [[ "$name" != $ONLY* ]] && return
  cp -r purifytf/assets/fashion-mnist .gpu/runs/$name
  timeout $((SECS + 200)) $PY examples/train_fashion_mnist.py $COMMON --out .gpu/runs/$name \
      --checkpoints .gpu/ckpt/$name "$@" $EXTRA 2>&1 | sed "s/^/$name: /" >> $OUT/train.log
  echo "$name exit ${PIPESTATUS[0]}" >> $OUT/train.log
}
INIT="--ddpm-init purifytf/assets/fashion-mnist/ddpm"
run A-init-b512 $INIT --ddpm-batch-size 512 --ddpm-lr 1e-3 --ddpm-ema 0.9995 &
run B-init-b2048 $INIT --ddpm-batch-size 2048 --ddpm-lr 2e-3 --ddpm-ema 0.999 &
run C-scratch-b512 --ddpm-batch-size 512 --ddpm-lr 2e-3 --ddpm-ema 0.9995 &
run D-24-48-64x1 --ddpm-widths 24 48 64 --ddpm-blocks 1 --ddpm-batch-size 512 --ddpm-lr 2e-3 --ddpm-ema 0.9995 &
run E-32-64-64x2 --ddpm-widths 32 64 64 --ddpm-blocks 2 --ddpm-batch-size 512 --ddpm-lr 2e-3 --ddpm-ema 0.9995 &
[ -n "$LOCAL" ] || (sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv) &
wait
$PY - <<'PY'
import json, os, pathlib, tarfile
out = pathlib.Path(os.environ["OUT"]); runs = pathlib.Path(".gpu/runs"); summary = {}
for run in sorted(runs.iterdir()):
    ckpt = pathlib.Path(".gpu/ckpt") / run.name
    m = run / "ddpm" / "metrics.json"
    if m.exists():
        summary[run.name] = json.loads(m.read_text())
    with tarfile.open(out / f"{run.name}.tar", "w") as tar:
        for f in (ckpt / "model.safetensors", ckpt / "config.json", ckpt / "sittings.json", m):
            if f.exists():
                tar.add(f, arcname=f"{run.name}/{f.name}")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
ok = {k: v for k, v in summary.items() if not k.startswith("E-") and "psnr_t400" in v}
best = max(ok, key=lambda k: ok[k]["psnr_t100"] + ok[k]["psnr_t200"] + ok[k]["psnr_t400"]) if ok else "A-init-b512"
with tarfile.open(out / f"state-{best}.tar", "w") as tar:
    for f in ("training_state.pt", "sittings.json"):
        if pathlib.Path(f".gpu/ckpt/{best}/{f}").exists():
            tar.add(f".gpu/ckpt/{best}/{f}", arcname=f"ckpt-{best}/{f}")
for k, v in summary.items():
    print(k, v["steps"], v["psnr_t100"], v["psnr_t200"], v["psnr_t400"], v.get("diffpure_classifier_accuracy_after_purification"), v.get("diffpure_heldout_classifier_accuracy_after_purification"))
PY
ls -la $OUT
