#!/usr/bin/env bash
# The one prepared GPU check: under 8 minutes on one CUDA GPU; results in the folder given first.
#   1. ResNet-50 at 224 px (Fashion-MNIST upscaled): a step of the whole model against steps from
#      the cache at layer2 and layer3 in the device tier, bf16 and int8 (cache_formats.py steps);
#   2. one short run with --policy none and one with the default policy (fxdrop finetune).
# Without CUDA it runs the same on CPU, smaller (ResNet-18 at 64 px, memory tier), so a test can
# run it. Needs torch, timm and safetensors, and Fashion-MNIST's IDX files (the Debian package
# dataset-fashion-mnist, or FXDROP_DATA=folder); the project is used from this checkout.
#   bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out/runs.txt"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fxdrop() { python -c "import sys; sys.argv[0] = 'fxdrop'; from cli.main import main; main()" "$@"; }

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  model=resnet50 size=224 images=512 batch=64 steps=20 tiers="device pinned" limit=2000 epochs=3
else
  model=resnet18 size=64 images=64 batch=16 steps=2 tiers="memory" limit=96 epochs=1
fi
python - "$out/device.json" <<'PY'
import json, platform, sys, torch
d = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "machine": platform.machine()}
if torch.cuda.is_available():
    d |= {"gpu": torch.cuda.get_device_name(0), "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
json.dump(d, open(sys.argv[1], "w"), indent=1)
print(d)
PY
start=$(date +%s)
# shellcheck disable=SC2086
python benchmarks/cache_formats.py --sections steps --model "$model" --img-size "$size" --images "$images" \
  --batch "$batch" --steps "$steps" --cuts layer2 layer3 --tiers $tiers --formats bf16 int8 --out "$out"
for policy in none learn-drop; do
  t0=$(date +%s.%N)
  fxdrop finetune "timm:$model" --data fashion-mnist --no-pretrained --img-size "$size" --limit "$limit" \
    --epochs "$epochs" --policy "$policy" --out "$out/run-$policy" --overwrite --no-keep-cache > "$out/run-$policy.log" 2>&1
  echo "$policy $(python -c "import time; print(round(time.time() - $t0, 2))")" >> "$out/runs.txt"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = [(out / "results.md").read_text(), "\n### none vs the default policy\n",
         "| policy | wall-clock s (command) | run s | final acc | drops |", "|---|---|---|---|---|"]
for line in (out / "runs.txt").read_text().split("\n"):
    if not line.strip():
        continue
    policy, wall = line.split()
    m = json.loads((out / f"run-{policy}" / "metrics.json").read_text())
    drops = ", ".join(f"{e['module']}@{e['epoch']}" for e in m["events"]) or "-"
    lines.append(f"| {policy} | {wall} | {m['total_seconds']:.1f} | {100 * m['final_val_acc']:.2f}% | {drops} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "gpu_check: $(( $(date +%s) - start )) s; results in $out"
