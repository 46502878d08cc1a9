#!/usr/bin/env bash
# One device call for the GPU side: the README's GPU commands, every GPU test, then kernel and end-to-end
# timings next to PyTorch. Run from the repository root on a GPU machine; logs and benchmarks.json go
# under $OUT.
#   bash benchmarks/gpu_device.sh [readme|tests|bench|all]   TORCH_REF=.anchors/torch_ref.py BENCH_FLAGS=--compile
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/smi.txt"
if [ "$what" = readme ] || [ "$what" = all ]; then
  # The README's `tinygrad-llm train --device cuda --dtype bf16` (and fp16), on a text file instead of the
  # built-in corpus (device machines may have no network): the default model, head dim 32, takes the
  # batched-GEMM attention path; d_model 384 with 4 heads (head dim 96) too. Then sample from the run.
  python3 -c "import sys; sys.path.insert(0, 'tests'); from text_sample import SHAKESPEARE; open('/tmp/readme_corpus.txt', 'w').write(SHAKESPEARE * 40)"
  for dtype in bf16 fp16; do
    TINYGRAD_LLM_REEXEC=0 timeout 300 python3 -m tinygrad_llm train --device cuda --dtype $dtype --data /tmp/readme_corpus.txt \
      --max-steps 30 --eval-interval 30 --eval-iters 2 --out-dir /tmp/readme_$dtype --no-progress 2>&1 | tee -a "$OUT/readme.log" | tail -4
    echo "train --dtype $dtype: exit $?" | tee -a "$OUT/readme.log"
  done
  TINYGRAD_LLM_REEXEC=0 timeout 300 python3 -m tinygrad_llm train --device cuda --dtype bf16 --data /tmp/readme_corpus.txt \
    --d-model 384 --n-heads 4 --max-steps 20 --eval-interval 20 --eval-iters 2 --out-dir /tmp/readme_d96 --no-progress 2>&1 \
    | tee -a "$OUT/readme.log" | tail -3
  TINYGRAD_LLM_REEXEC=0 timeout 120 python3 -m tinygrad_llm sample /tmp/readme_bf16 --device cuda --prompt "ROMEO:" \
    --max-new-tokens 40 2>&1 | tee -a "$OUT/readme.log" | tail -3
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest tests/ -q --tb=short -p no:cacheprovider -m gpu ${TEST_FLAGS} 2>&1 \
    | tee "$OUT/tests.log" | grep -vE '^\s*$' | tail -45
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/gpu.py --out "$OUT" ${TORCH_REF:+--torch-ref "$TORCH_REF"} ${BENCH_FLAGS} \
    2>&1 | tee "$OUT/bench.log" | tail -40
fi
