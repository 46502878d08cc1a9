#!/usr/bin/env bash
# One device call for issue 6 (tinygrad_llm.gpu): GPU tests, then kernel and end-to-end timings next to
# PyTorch. Run from the repository root on the device machine; logs and benchmarks.json go under $OUT.
#   bash benchmarks/gpu_device.sh [tests|bench|all]      TORCH_REF=.anchors/torch_ref.py BENCH_FLAGS=--compile
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/smi.txt"
if [ "$what" != bench ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/test_gpu.py -q --tb=short -p no:cacheprovider ${TEST_FLAGS} 2>&1 \
    | tee "$OUT/tests.log" | grep -vE '^\s*$' | tail -45
fi
if [ "$what" != tests ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/gpu.py --out "$OUT" ${TORCH_REF:+--torch-ref "$TORCH_REF"} ${BENCH_FLAGS} \
    2>&1 | tee "$OUT/bench.log" | tail -40
fi
