"""The training step with its decisions on the device (tinygrad_llm.device_step), run on NumPy arrays:
the same updates as train.train_step, seeds that live in an array, and the host checks of its inputs.
tests/test_gpu_train_graph.py runs it on the GPU, captured and not."""
from __future__ import annotations

import numpy as np
import pytest

from text_sample import SHAKESPEARE
from tinygrad_llm import rng
from tinygrad_llm.data.feed import build_data
from tinygrad_llm.device_step import DeviceStep, check_batch
from tinygrad_llm.distributed import DataParallel, SingleProcess
from tinygrad_llm.model import GPT
from tinygrad_llm.ops.attention import kernel_dropout
from tinygrad_llm.optim import AdamW
from tinygrad_llm.train import TrainConfig, train_step


@pytest.fixture()
def setup(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SHAKESPEARE * 3, encoding="utf-8")

    def make(**overrides):
        values = dict(data=str(path), out_dir=str(tmp_path / "run"), d_model=32, n_layers=2, n_heads=4,
                      ffn_hidden=64, batch_size=4, seq_len=16, max_steps=8, warmup_steps=2, lr=3e-2,
                      grad_clip=0.5, progress=False, seed=0)
        values.update(overrides)
        config = TrainConfig(**values)
        data = build_data(config)
        rng.manual_seed(0)
        model = GPT(config.model_config(data.tokenizer.vocab_size))
        optimizer = AdamW(model.named_parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                          eps=config.eps, weight_decay=config.weight_decay)
        return config, data, model, optimizer
    return make


def _weights(model):
    return [p.data.copy() for p in model.parameters()]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_device_step_takes_train_steps_updates(setup, grad_accum):
    """Without dropout both steps see the same batches and make the same update (clipping included:
    lr 3e-2 and grad_clip 0.5 clip every step), to float32 rounding of the norm and clipping factor."""
    results = []
    for which in ("host", "device"):
        config, data, model, optimizer = setup(grad_accum=grad_accum)
        device_step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size)
        parallel = DataParallel(model, optimizer, SingleProcess())
        trace = []
        for step in range(4):
            if which == "host":
                result = train_step(model, optimizer, data.train, step, config, "cpu", None, parallel)
                trace.append((result.loss, result.grad_norm, result.lr, result.applied))
            else:
                trace.append(device_step(data.train, step))
        results.append((trace, _weights(model), optimizer.step_count, data.train.step))
    (host, host_weights, host_count, host_position), (device, device_weights, device_count, device_position) = results
    assert host_count == device_count == 4 and host_position == device_position == 4 * grad_accum
    for a, b in zip(host, device):
        assert a[3] and b[3] and a[2] == b[2]
        np.testing.assert_allclose(a[:2], b[:2], rtol=2e-5)
        assert a[1] > 0.5                                  # the clipping was active
    for a, b in zip(host_weights, device_weights):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_a_non_finite_step_changes_nothing_and_is_reported(setup):
    config, data, model, optimizer = setup()
    device_step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size)
    device_step(data.train, 0)
    moments = [g.exp_avg.copy() for g in optimizer.groups]
    model.lm_head.weight.data[0, 0] = np.nan
    before = _weights(model)
    loss, grad_norm, _, applied = device_step(data.train, 1)
    assert not applied and not (np.isfinite(loss) and np.isfinite(grad_norm))
    assert optimizer.step_count == 1
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)
    for group, saved in zip(optimizer.groups, moments):
        np.testing.assert_array_equal(group.exp_avg, saved)


def test_dropout_seeds_come_from_the_step_base_and_differ_between_steps(setup):
    config, data, model, optimizer = setup(dropout=0.2, attention_dropout=0.2, lr=0.0, warmup_steps=0)
    device_step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size)
    state = rng.get_state()
    first = device_step(data.train, 0)[0]
    data.train.step = 0
    rng.set_state(state)
    again = device_step(data.train, 0)[0]
    other = device_step(data.train, 0)[0]                # same batch, the next base
    assert first == again                                 # the base is drawn from the global generator
    assert other != first


def test_device_seeds_give_the_same_offsets_every_step_and_add_the_base():
    base = np.array([0x0123456789ABCDEF], dtype=np.uint64)
    draws = []
    for _ in range(2):
        with rng.device_seeds(base):
            draws.append([rng.next_seed() for _ in range(3)])
    assert [s.offset for s in draws[0]] == [s.offset for s in draws[1]]
    assert len({s.offset for s in draws[0]}) == 3
    seed = draws[0][1]
    assert int(seed) == (0x0123456789ABCDEF + seed.offset) % 2**64
    base[0] = 5
    assert int(seed) == (5 + seed.offset) % 2**64           # read when used, not when drawn
    # the words the kernels get: the offset's words plus base's low and high words
    s0, s1, threshold = rng.dropout_words(seed, 0.75, row_offset=3)
    o0, o1, _ = rng.dropout_words(seed.offset, 0.75, row_offset=3)
    assert (s0, s1) == ((o0 + 5) % 2**32, o1) and threshold == int(0.75 * 2**32)
    launch = kernel_dropout((seed, 0.75), 3)
    assert launch[0] is base and launch[1:3] == (o0, o1)
    with pytest.raises(RuntimeError):
        with rng.device_seeds(base), rng.device_seeds(base):
            pass
    with pytest.raises(TypeError):
        rng.DeviceSeed(np.zeros(2, dtype=np.uint64), 0)


def test_the_attention_mask_of_a_device_seed_is_the_mask_of_its_words(rng_generator=None):
    from tinygrad_llm.ops.attention import dropout_mask
    base = np.array([2**40 + 17], dtype=np.uint64)
    seed = rng.DeviceSeed(base, 12345)
    mask = dropout_mask(seed, 0.8, (1, 2, 5, 5))
    words = rng.dropout_words(seed, 0.8)
    rows = np.arange(10).reshape(1, 2, 5, 1)
    expected = (rng.hash_bits(words, rows, np.arange(5)) < np.uint32(words[2])) / 0.8
    np.testing.assert_array_equal(mask, expected)


def test_bad_batches_are_refused_on_the_host_with_the_ops_messages():
    good = np.array([[1, 2]])
    check_batch(good, np.array([[2, -100]]), vocab=3)
    with pytest.raises(IndexError, match="embedding: ids must lie in"):
        check_batch(np.array([[1, 3]]), good, vocab=3)
    with pytest.raises(IndexError, match="cross_entropy: target -1"):
        check_batch(good, np.array([[1, -1]]), vocab=3)
    with pytest.raises(TypeError, match="integers"):
        check_batch(good.astype(np.float32), good, vocab=3)


def test_a_reason_given_at_construction_keeps_every_step_uncaptured(setup):
    config, data, model, optimizer = setup()
    step = DeviceStep(model, optimizer, config, data.tokenizer.vocab_size, graphs=True,
                      not_captured="no attention kernel for head dim 8")
    for i in range(2):
        assert step(data.train, i)[3] and not step.captured
    assert step.graph is None and "no attention kernel for head dim 8" in step.describe()


def test_ops_skip_their_device_checks_only_inside_the_checked_block():
    from tinygrad_llm import backend
    from tinygrad_llm import functional as F
    from tinygrad_llm.tensor import Tensor
    logits = Tensor(np.zeros((2, 5), dtype=np.float32))
    bad = np.array([1, 7])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        F.cross_entropy(logits, bad)
    assert not backend.inputs_checked()
    with backend.inputs_checked_on_host():
        with backend.inputs_checked_on_host():
            assert backend.inputs_checked()
        assert backend.inputs_checked()                   # nested blocks restore what they found
        np.testing.assert_array_equal(F.embedding(np.array([0, 1]), Tensor(np.eye(3, dtype=np.float32))).data,
                                      np.eye(3, dtype=np.float32)[:2])
    assert not backend.inputs_checked()
    with pytest.raises(IndexError, match="ids must lie in"):
        F.embedding(np.array([0, 3]), Tensor(np.eye(3, dtype=np.float32)))
