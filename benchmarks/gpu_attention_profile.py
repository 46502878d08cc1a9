"""One forward and one backward launch of the flash-attention kernels (B16 H12 T1024 D64 bf16), after a
warm-up pair, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:'attention_(forward|backward)_bf16_d' --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats python3 benchmarks/gpu_attention_profile.py

The backward's side passes beside its main kernel (the Δ / dq-zeroing pre-pass and the dq cast; each
pair of calls launches forward, pre-pass, backward, cast), their durations only:

    ncu --clock-control none --kernel-name regex:'attention_' --launch-skip 4 --launch-count 4 \
        --metrics gpu__time_duration.sum python3 benchmarks/gpu_attention_profile.py
"""
import ml_dtypes
import numpy as np

from tinygrad_llm import backend
from tinygrad_llm.gpu import attention

cp = backend.cupy_module()
rng = np.random.default_rng(0)
q, k, v, dy = (cp.asarray(rng.standard_normal((16, 12, 1024, 64), dtype=np.float32).astype(ml_dtypes.bfloat16))
               for _ in range(4))
for _ in range(2):
    out, lse = attention.causal_attention_forward(q, k, v)
    attention.causal_attention_backward(dy, q, k, v, out, lse)
cp.cuda.Device().synchronize()
