"""The whole model on the GPU against the CPU, at every head dim and precision policy.

For each head dim (16, 32, 64, 96, 128: some have an attention kernel, some take the batched-GEMM path),
each policy (fp32, tf32, bf16, fp16) and both head layouts (MHA, GQA with two query heads a kv head), one
training step runs twice from the same seed: on the CPU in float32, and on the GPU under the policy. The
step is forward, backward and one AdamW update, then a second forward. Compared: the loss, every
parameter's gradient (relative L2 error), and the loss after the update. Tolerances are the policy's:
float32 products agree to rounding, TF32 rounds the product inputs to 10 mantissa bits, bf16/fp16 carry
the activations in 8/11 bits. Skipped without a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinygrad_llm import backend, manual_seed, precision
from tinygrad_llm.model import GPT, GPTConfig
from tinygrad_llm.optim import AdamW

HEAD_DIMS = (16, 32, 64, 96, 128)
POLICIES = ("fp32", "tf32", "bf16", "fp16")
# policy: (loss, gradients, loss after the step), relative
TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-5), "tf32": (5e-3, 3e-2, 5e-3),
             "bf16": (2e-2, 0.1, 2e-2), "fp16": (2e-2, 0.1, 2e-2)}

needs_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="needs an NVIDIA GPU and CuPy")


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _one_step(config, ids, targets, device, policy_name, return_logits=True):
    """Loss, float32 gradients by name, and the loss after one AdamW step, on `device` under the policy.
    return_logits=False: the first loss from the training head (F.linear_cross_entropy)."""
    manual_seed(2024)
    model = GPT(config).to(device)
    optimizer = AdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    ids, targets = backend.to_device(ids, device), backend.to_device(targets, device)
    with precision.policy(policy_name):
        _, loss = model(ids, targets, return_logits=return_logits)
        assert loss.dtype == np.float32                     # a 16-bit policy's loss too
        loss.backward()
        grads = {name: backend.to_numpy(p.grad).astype(np.float32) for name, p in model.named_parameters()}
        optimizer.step()
        _, loss_after = model(ids, targets)
    return float(loss.item()), grads, float(loss_after.item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_model_step_on_the_gpu_matches_the_cpu(head_dim, policy_name, kv_heads):
    config = GPTConfig(vocab_size=101, d_model=2 * head_dim, n_layers=2, n_heads=2, n_kv_heads=kv_heads,
                       ffn_hidden=3 * head_dim, max_seq_len=64)
    rng = np.random.default_rng(head_dim * 10 + kv_heads)
    ids = rng.integers(0, config.vocab_size, (2, 64))
    targets = rng.integers(0, config.vocab_size, (2, 64))
    targets[1, :7] = -100                                   # ignored positions take part too
    cpu_loss, cpu_grads, cpu_after = _one_step(config, ids, targets, "cpu", "fp32")
    gpu_loss, gpu_grads, gpu_after = _one_step(config, ids, targets, "cuda", policy_name)
    loss_tolerance, grad_tolerance, after_tolerance = TOLERANCE[policy_name]
    assert np.isfinite(gpu_loss) and np.isfinite(gpu_after)
    assert abs(gpu_loss - cpu_loss) <= loss_tolerance * abs(cpu_loss), (gpu_loss, cpu_loss)
    worst = max(cpu_grads, key=lambda name: _relative_error(gpu_grads[name], cpu_grads[name]))
    assert _relative_error(gpu_grads[worst], cpu_grads[worst]) <= grad_tolerance, worst
    assert abs(gpu_after - cpu_after) <= after_tolerance * abs(cpu_after), (gpu_after, cpu_after)
    assert cpu_after < cpu_loss                             # the step is a real update, not a no-op


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("policy_name", POLICIES)
def test_the_training_head_on_the_gpu_matches_the_cpu(policy_name):
    """The same step through F.linear_cross_entropy (what training runs: the GEMM and the cross-entropy
    kernel written over the logits), head dim 64."""
    config = GPTConfig(vocab_size=101, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192,
                       max_seq_len=64)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, config.vocab_size, (2, 64))
    targets = rng.integers(0, config.vocab_size, (2, 64))
    targets[0, -5:] = -100
    cpu_loss, cpu_grads, cpu_after = _one_step(config, ids, targets, "cpu", "fp32", return_logits=False)
    gpu_loss, gpu_grads, gpu_after = _one_step(config, ids, targets, "cuda", policy_name, return_logits=False)
    loss_tolerance, grad_tolerance, after_tolerance = TOLERANCE[policy_name]
    assert abs(gpu_loss - cpu_loss) <= loss_tolerance * abs(cpu_loss), (gpu_loss, cpu_loss)
    for name, want in cpu_grads.items():
        assert _relative_error(gpu_grads[name], want) <= grad_tolerance, name
    assert abs(gpu_after - cpu_after) <= after_tolerance * abs(cpu_after), (gpu_after, cpu_after)
