"""The ops, one module per family. Each op is a `Function` with forward/backward on raw arrays.

elementwise  add sub mul div neg pow exp log sqrt tanh maximum cast, and `unbroadcast`
reduce       sum mean max
movement     reshape permute getitem concatenate stack
matmul       matmul (batched, broadcasting), linear (x @ Wᵀ)
activation   softmax log_softmax silu gelu swiglu
norm         rms_norm
rope         rope (rotate-half)
attention    causal_attention (grouped-query, log-sum-exp saved, probabilities recomputed)
loss         cross_entropy
embedding    embedding
dropout      dropout
"""
