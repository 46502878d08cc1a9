#!/usr/bin/env bash
# One device call for the flash-attention kernels: SASS check, correctness tests, timings next to SDPA.
# Run from the repository root on the device machine: bash benchmarks/gpu_attention_device.sh [tests|bench|all|d128]
#   d128: head dim 128 on Hopper (about 3–4 minutes): a table of relative errors of every bf16 build
#   (benchmarks/gpu_attention.py --check), the attention tests (tests/test_gpu_attention.py whole, the
#   dropout tests at head dim 128), the head-dim-128 table (wgmma and mma.sync builds side by side with
#   SDPA, two rounds and the worst of them), the head-dim-64 row, and ptxas registers/spills.
#   TINYGRAD_LLM_ATTENTION_WGMMA=64 sends head dim 128 back to the mma.sync builds should the wgmma ones fail.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attention_out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/smi.txt"
if [ "$what" = d128 ]; then
  # ptxas registers and spills of the sm_90a kernels, compiled beside the GPU work and printed at the end
  nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v -o /tmp/attention_hopper.cubin \
       -I kernels kernels/attention_hopper.cu > "$OUT/ptxas_hopper.txt" 2>&1 &
  echo "== correctness of every bf16 build (relative error, bound 1e-2)"
  timeout 120 python3 benchmarks/gpu_attention.py --check 2>&1 | tee "$OUT/check.log" | tail -30
  echo "== tests"
  timeout 200 python3 -m pytest tests/test_gpu_attention.py tests/test_gpu_attention_dropout.py -k "128 or not dropout" \
    -q --tb=line -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | grep -vE '^\s*$' | tail -30
  echo "== head dim 128: wgmma (wp2/wk) and mma.sync (w8/w4) builds, SDPA in the same process"
  timeout 150 python3 benchmarks/gpu_attention.py --d128 --rounds 2 2>&1 | tee "$OUT/bench_d128.log"
  echo "== head dim 64 (its kernels' code is unchanged): the issue-7 shape"
  timeout 60 python3 benchmarks/gpu_attention.py --first 1 2>&1 | tee "$OUT/bench_d64.log"
  wait
  echo "== ptxas (sm_90a)"
  grep -E "Compiling entry|registers|spill" "$OUT/ptxas_hopper.txt" | paste - - - | sed -E 's/ptxas info *: //g' \
    | sed -E "s/Compiling entry function '([a-z0-9_]+)' for 'sm_90a'/\1/" | cut -c1-150
  exit 0
fi
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
