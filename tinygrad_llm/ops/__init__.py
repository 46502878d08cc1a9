"""The ops, one module per family. Each op is a `Function` with forward/backward on raw arrays.

An op with several paths (a CUDA kernel through `gpu.kernel`, a chunked-threaded NumPy path, the plain
array expression) picks one in its forward, saves that choice, and its backward follows it.

elementwise  add sub mul div neg pow exp log sqrt tanh maximum cast, and `unbroadcast`
reduce       sum mean max
movement     reshape permute getitem concatenate stack
matmul       matmul (batched, broadcasting), linear (x @ Wᵀ)
activation   softmax log_softmax silu gelu swiglu (also on a packed gate‖up)
norm         rms_norm (kernel, chunked-threaded CPU, plain paths)
rope         rope (rotate-half), rotate_into
attention    causal_attention (grouped-query, log-sum-exp saved, probabilities recomputed or kept),
             and its packed form rope_attention (RoPE + attention on one q‖k‖v projection, KV cache)
loss         cross_entropy, linear_cross_entropy (the output head and the loss in one op)
embedding    embedding
dropout      dropout
"""
