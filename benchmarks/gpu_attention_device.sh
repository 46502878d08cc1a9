#!/usr/bin/env bash
# One device call for the flash-attention kernels: SASS check, correctness tests, timings next to SDPA.
# Run from the repository root on the device machine: bash benchmarks/gpu_attention_device.sh [tests|bench|all]
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attention_out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/smi.txt"
for f in forward backward hopper; do
  arch=90; [ $f = hopper ] && arch=90a
  nvcc -std=c++17 -gencode=arch=compute_$arch,code=sm_$arch -cubin -Xptxas -v -o "/tmp/attention_$f.cubin" \
       -I kernels "kernels/attention_$f.cu" > "$OUT/ptxas_$f.txt" 2>&1
  cuobjdump --dump-sass "/tmp/attention_$f.cubin" > "/tmp/sass_$f.txt" 2>&1
  echo "$f: HMMA $(grep -c HMMA /tmp/sass_$f.txt)  HGMMA $(grep -c HGMMA /tmp/sass_$f.txt)  LDSM $(grep -c LDSM /tmp/sass_$f.txt)  RED $(grep -c 'RED' /tmp/sass_$f.txt)  LDL/STL $(grep -cE 'LDL|STL' /tmp/sass_$f.txt)"
done
if [ "$what" != bench ]; then
  timeout 170 python3 -m pytest tests/test_gpu_attention.py -q --tb=short -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | grep -vE '^\s*$' | tail -40
fi
if [ "$what" != tests ]; then
  timeout 90 ncu --clock-control none --kernel-name regex:'attention_(forward|backward)_bf16_d' --launch-skip 2 \
    --launch-count 2 --section SpeedOfLight --section WarpStateStats --section Occupancy \
    python3 benchmarks/gpu_attention_profile.py > "$OUT/ncu.txt" 2>&1
  grep -E "attention_|Throughput|Duration|Achieved Occupancy|Stall|Warp Cycles Per Issued" "$OUT/ncu.txt" | grep -v "^==PROF==" | cut -c1-110 | head -40
  timeout 150 python3 benchmarks/gpu_attention.py 2>&1 | tee "$OUT/bench.log"
fi
