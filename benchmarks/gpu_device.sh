#!/usr/bin/env bash
# One device call for the GPU side: the README's GPU commands, every GPU test, then kernel and end-to-end
# timings next to PyTorch. Run from the repository root on a GPU machine; logs and benchmarks.json go
# under $OUT.
#   bash benchmarks/gpu_device.sh [readme|tests|bench|quality|all]   TORCH_REF=.anchors/torch_ref.py BENCH_FLAGS=--compile
#   quality: the char model's time to val ≤ 1.48 (nanoGPT's GPU config, dropout and attention dropout 0.2, 1000 steps)
#   beside torch_ref.py's eager run, ours with empty kernel caches (compilation counted; WARM=1 runs it
#   again with the caches it filled; ROUNDS=n alternates n first runs on each side); DATA=tinyshakespeare.txt
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
if [ "$what" = quality ] || [ "$what" = all ]; then
  # ROUNDS=n alternates n first runs of ours with n of PyTorch's (default 1); WARM=1 then runs ours once more
  # with the caches its last first run filled
  for round in $(seq 1 "${ROUNDS:-1}"); do
    cold=$(mktemp -d)
    # empty caches: ours, CuPy's, and the driver's (NVRTC on CUDA 13 keeps compiled code there too)
    TINYGRAD_LLM_CACHE=$cold/ours CUPY_CACHE_DIR=$cold/cupy CUDA_CACHE_PATH=$cold/nv timeout 300 python3 -m tinygrad_llm train --data "$DATA" \
      --device cuda --precision bf16 --d-model 384 --n-layers 6 --n-heads 6 --ffn-hidden 1024 --seq-len 256 \
      --batch-size 64 --dropout 0.2 --attention-dropout 0.2 --lr 1e-3 --min-lr-ratio 0.1 --warmup-steps 100 \
      --beta2 0.99 --weight-decay 0.1 --max-steps 1000 --eval-interval 250 --eval-iters 200 --out-dir "$cold/run" \
      --no-progress 2>&1 | tee "$OUT/quality_ours_$round.log" | grep -E "val loss|training step|attention"
    if [ -n "$TORCH_REF" ]; then
      timeout 300 python3 "$TORCH_REF" train --config shakespeare-char --device cuda --dtype bf16 \
        --eval-every 250 --iters 1000 --data "$DATA" 2>&1 | tee "$OUT/quality_torch_$round.log" | tail -2
    fi
  done
  if [ -n "$WARM" ]; then TINYGRAD_LLM_CACHE=$cold/ours CUPY_CACHE_DIR=$cold/cupy CUDA_CACHE_PATH=$cold/nv timeout 300 \
    python3 -m tinygrad_llm train --data "$DATA" \
    --device cuda --precision bf16 --d-model 384 --n-layers 6 --n-heads 6 --ffn-hidden 1024 --seq-len 256 \
    --batch-size 64 --dropout 0.2 --attention-dropout 0.2 --lr 1e-3 --min-lr-ratio 0.1 --warmup-steps 100 \
    --beta2 0.99 --weight-decay 0.1 --max-steps 1000 --eval-interval 250 --eval-iters 200 --out-dir "$cold/run2" \
    --no-progress 2>&1 | tee "$OUT/quality_ours_warm.log" | grep -E "val loss"; fi
fi
