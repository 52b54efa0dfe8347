#!/usr/bin/env bash
# One device call: GPU correctness (kernel tests natively, full-shape checks), then the benchmark.
#   bash benchmarks/device_check.sh COMMIT [--quick] [--skip-tests] [attention.py options]
# Writes under $OUT: tests.log, correctness.json, attention.json, tuned.json. Installs nothing.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hack_out}
mkdir -p "$OUT"
COMMIT=${1:-unknown}
shift || true
QUICK=""; TESTS=1; EXTRA=()
for a in "$@"; do
  case $a in --quick) QUICK=--quick ;; --skip-tests) TESTS=0 ;; *) EXTRA+=("$a") ;; esac
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$TESTS" = 1 ]; then
  timeout 240 python3 -m pytest -q -x tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
fi
timeout 200 python3 benchmarks/device_correctness.py --out "$OUT/correctness.json" 2>&1 | tail -15
python3 benchmarks/attention.py --out "$OUT/attention.json" --tune-out "$OUT/tuned.json" \
  --commit "$COMMIT" $QUICK "${EXTRA[@]}"
