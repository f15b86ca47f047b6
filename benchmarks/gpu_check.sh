#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, within 10 minutes, the default pipeline (`dvc repro` of a clean clone of this
# repository's last commit) and the training benchmark (benchmarks/train_throughput.py, MFU against the
# device's dense bf16 peak), with the figures written to benchmarks/results/gpu_check/.
#
#   bash benchmarks/gpu_check.sh              # from anywhere in the repository
#   PEAK_TFLOPS=989 bash benchmarks/gpu_check.sh   # a device the table below does not know
#
# Uses the active Python environment when it has the pinned packages, else makes GPU_CHECK_VENV (default
# ~/.cache/stages/venv-gpu, outside the repository) and installs
# requirements.txt, requirements-nodeps.txt and benchmarks/requirements.txt there (the CUDA build of the
# pinned torch comes from PyPI; installing is not counted in the 10 minutes). GPU_CHECK_SECONDS (default 600)
# bounds the pipeline and the benchmark together; whatever finished by then is written.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
ROOT=$(pwd)
BUDGET=${GPU_CHECK_SECONDS:-600}
OUT=$ROOT/benchmarks/results/gpu_check
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L | grep -q '^GPU '; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi lists none)" >&2
  exit 2
fi
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
peak_for() {
  case "$1" in
    *B200*) echo 2250 ;; *H200*|*GH200*) echo 989 ;; *"H100 PCIe"*|*H100*PCIe*) echo 756 ;; *H100*) echo 989 ;;
    *A100*) echo 312 ;; *L40S*) echo 362 ;; *L40*) echo 181 ;; *L4*) echo 121 ;; *A10G*) echo 70 ;; *A10*) echo 125 ;;
    *"RTX 4090"*) echo 165 ;; *"RTX 3090"*) echo 71 ;; *V100*|*T4*) echo "" ;;  # no bf16 tensor cores
    *) echo "" ;;
  esac
}
PEAK=${PEAK_TFLOPS:-$(peak_for "$DEVICE")}

installed() { python -c "import torch, transformers, dvc, trl; assert torch.cuda.is_available()" 2>/dev/null; }
install_started=$SECONDS
if ! installed; then
  VENV=${GPU_CHECK_VENV:-$HOME/.cache/stages/venv-gpu}
  if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
  . "$VENV/bin/activate"
  if ! installed; then
    pip install -q --upgrade pip
    pip install -q -r requirements.txt -r benchmarks/requirements.txt
    pip install -q --no-deps -r requirements-nodeps.txt
  fi
fi
install_s=$((SECONDS - install_started))
installed || { echo "gpu_check: torch does not see the GPU after installing (driver too old for torch's CUDA build?)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/repo"   # the last commit, so the check changes nothing in this working tree
cd "$WORK/repo"
started=$SECONDS
left() { echo $((BUDGET - (SECONDS - started))); }

pipeline_status=0
timeout --signal=TERM --kill-after=15 "$(left)" dvc repro > "$OUT/pipeline.log" 2>&1 || pipeline_status=$?
pipeline_s=$((SECONDS - started))
for file in metrics/*.json metrics/runtime/*.json; do
  [ -f "$file" ] && mkdir -p "$OUT/$(dirname "$file")" && cp "$file" "$OUT/$file"
done

bench_status=skipped
if [ "$pipeline_status" = 0 ] && [ "$(left)" -gt 60 ]; then
  bench_status=0
  timeout --signal=TERM --kill-after=15 "$(left)" python benchmarks/train_throughput.py --variants stage baseline trl-bf16 \
    ${PEAK:+--peak-tflops "$PEAK"} --output "$OUT/train_throughput.json" > "$OUT/benchmark.log" 2>&1 || bench_status=$?
fi

python - "$OUT" "$DEVICE" "${PEAK:-}" "$install_s" "$pipeline_s" "$pipeline_status" "$bench_status" "$((SECONDS - started))" "$BUDGET" <<'PY'
import json, sys
from pathlib import Path
out, device, peak, install_s, pipeline_s, pipeline_status, bench_status, total_s, budget = sys.argv[1:]
def read(path):
    try:
        return json.loads((Path(out) / path).read_text())
    except (OSError, ValueError):
        return None
train, runtime, bench = read("metrics/train.json"), read("metrics/runtime/train.json"), read("train_throughput.json")
summary = {
    "device": device, "dense_bf16_peak_tflops": float(peak) if peak else None,
    "install_s": int(install_s), "pipeline_s": int(pipeline_s), "pipeline_exit": int(pipeline_status),
    "benchmark_exit": bench_status, "check_s": int(total_s), "budget_s": int(budget),
    "train": {key: (runtime or {}).get(key) for key in ("tokens_per_s", "fraction_of_ceiling", "ceiling_tokens_per_s",
                                                          "wall_time_s", "peak_memory_mb", "precision", "compile")},
    "val_loss_after": (train or {}).get("val_loss_after"),
    "benchmark": {name: {key: row.get(key) for key in ("tokens_per_s", "steady_tokens_per_s", "fraction_of_ceiling", "mfu",
                                                         "heldout_loss", "s_per_step")}
                  for name, row in ((bench or {}).get("runs") or {}).items()},
}
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
[ "$pipeline_status" = 0 ] && [ "$bench_status" = 0 ]
