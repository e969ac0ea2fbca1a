#!/usr/bin/env bash
# One-command device check for a machine with a CUDA GPU (aims at < 8 minutes): the GPU test
# tier, a profile of the real GPU, and a mixed job (the GPU as a real kind beside two emulated
# kinds); figures go to out/device-check/. Needs a torch build with CUDA in $PY's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device-check}
PY=${PY:-.venv/bin/python}
HETRAIN=${HETRAIN:-$(dirname "$PY")/hetrain}
mkdir -p "$OUT"
start=$(date +%s)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device-check: torch in $PY has no usable CUDA device; install a CUDA build" >&2
    exit 2
fi

echo "== devices"
"$HETRAIN" devices --json "$OUT/devices.json" > "$OUT/devices.txt"

echo "== GPU test tier (pytest -m gpu)"
timeout 240 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt"

echo "== profile of the GPU"
timeout 120 "$HETRAIN" profile --model small --seq-len 256 --micro-batch-size 4 \
    --out "$OUT/profile.json" | tee "$OUT/profile.txt"

echo "== mixed job: the GPU real, two kinds emulated"
# The GPU's catalog kind when its name matches one, else a kind declared for it.
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
found = json.load(open(f"{out}/devices.json"))["devices"]
gpu = next(d for d in found if d["device_type"] == "cuda")
if gpu["kind"]:
    real = {gpu["kind"]: {"mode": "real"}}
    name = gpu["kind"]
else:
    name = "local-gpu"
    real = {name: {"vendor": "nvidia", "device_type": "cuda", "mode": "real",
                   "flops": {"fp32": 60e12, "bf16": 900e12},
                   "memory_gib": max(gpu["memory_gib"], 1.0), "memory_bandwidth_gbps": 2000,
                   "source": "device-check: an unmatched GPU, nominal figures"}}
cluster = {"name": "gpu-and-emulated",
           "kinds": {**real, "V100": {"mode": "emulated"}, "MLU370": {"mode": "emulated"}},
           "nodes": [{"name": "gpu", "kind": name}, {"name": "v100", "kind": "V100"},
                     {"name": "mlu", "kind": "MLU370"}]}
json.dump(cluster, open(f"{out}/gpu-and-emulated.yaml", "w"), indent=1)  # JSON is YAML
PYEOF
timeout 180 "$HETRAIN" train --cluster "$OUT/gpu-and-emulated.yaml" --steps 20 \
    --json "$OUT/train.json" --trace "$OUT/train-trace.json" | tee "$OUT/train.txt"

echo "== figures"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from hetrain.sim.gantt import draw_gantt
from hetrain.trace import load_chrome_trace
out = sys.argv[1]
events, _ = load_chrome_trace(f"{out}/train-trace.json")
last = max(e.end_s for e in events)
tail = [e for e in events if e.start_s > 0.8 * last]  # the last steps, readable
draw_gantt(tail, f"{out}/train-gantt.png", title="GPU real + V100, MLU370 emulated")
summary = json.load(open(f"{out}/train.json"))
print(json.dumps({"modes": summary["modes"], "tokens_per_s": summary["tokens_per_s"],
                  "late_s": summary["late_s"], "per_group_bytes": {
                      g: [v["estimated_bytes"], v["measured_bytes"]]
                      for g, v in summary["per_group"].items()}}, indent=1))
PYEOF
echo "device-check: done in $(( $(date +%s) - start )) s; figures in $OUT/"
