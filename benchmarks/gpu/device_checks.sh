#!/usr/bin/env bash
# Issue #20's GPU checks in one run on a lent GPU machine (see benchmarks/gpu/README.md):
#   kernel correctness tests, 4-bit train/save/load on CUDA, fused kernel vs SDPA at n = 512 and 4096, and the
#   end-to-end training step of the Qwen2.5-VL-3B-config model; results under $OUT (summary.json, e2e.json, ...).
# Wheels carried in .whl/ (benchmarks/gpu/prepare_wheels.sh) are installed into .whl-site/ (in the checkout) first, so the machine's
# Python runs the transformers / PEFT / bitsandbytes versions this checkout is tested with.
# Usage: OUT=/some/dir BUDGET_S=330 bash benchmarks/gpu/device_checks.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
BUDGET_S=${BUDGET_S:-330}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl-site .whl/*.whl \
    >"$OUT/device_checks.log" 2>&1 || { echo "installing the carried wheels failed"; tail -20 "$OUT/device_checks.log"; exit 3; }
  export PYTHONPATH="$PWD/.whl-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$OUT/device_checks.log" 2>&1
"$PY" benchmarks/gpu/device_checks.py --out "$OUT" --budget-s "$BUDGET_S"
status=$?
cat "$OUT/e2e.md" 2>/dev/null
cat "$OUT/fused/fused_kernel.md" 2>/dev/null
exit $status
