"""Loader: (x, y) windows, determinism from (seed, step), exact resume, disjoint ranks."""
import json

import numpy as np
import pytest

from tinygrad_llm.data.loader import DataLoader, shard_paths
from tinygrad_llm.data.shards import write_shard


@pytest.fixture
def shard_dir(tmp_path):
    # token value = global position, so a window's identity can be read off its first token
    write_shard(tmp_path / "d_train_000000.bin", np.arange(0, 1000), vocab_size=5000)
    write_shard(tmp_path / "d_train_000001.bin", np.arange(1000, 1650), vocab_size=5000)
    write_shard(tmp_path / "d_val_000000.bin", np.arange(4000, 4100), vocab_size=5000)
    return tmp_path


def test_windows_are_shifted_pairs_inside_one_shard(shard_dir):
    loader = DataLoader(shard_dir, batch_size=4, seq_len=16, seed=0)
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1]) and np.all(y[:, -1] == x[:, -1] + 1)
        assert np.all(np.diff(x, axis=1) == 1)             # never crosses a shard boundary
    assert loader.num_windows == 999 // 16 + 649 // 16


def test_deterministic_from_seed_and_step(shard_dir):
    a = DataLoader(shard_dir, 8, 16, seed=3)
    b = DataLoader(shard_dir, 8, 16, seed=3)
    c = DataLoader(shard_dir, 8, 16, seed=4)
    batches = [a.next_batch()[0] for _ in range(30)]
    assert all(np.array_equal(batches[s], b.batch(s)[0]) for s in range(30))
    assert not all(np.array_equal(batches[s], c.batch(s)[0]) for s in range(30))


def test_resume_is_exact_through_json(shard_dir):
    a = DataLoader(shard_dir, 5, 16, seed=1)
    for _ in range(23):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(40)]          # crosses epoch boundaries (101 windows / 5)
    b = DataLoader(shard_dir, 5, 16, seed=1)
    b.load_state_dict(state)
    for x, y in expected:
        bx, by = b.next_batch()
        assert np.array_equal(x, bx) and np.array_equal(y, by)
    assert state["step"] == 23 and state["shard"].startswith("d_train_") and state["epoch"] == 1
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(shard_dir, 6, 16, seed=1).load_state_dict(state)


def test_epoch_visits_every_window_once(shard_dir):
    for shuffle in (True, False):
        loader = DataLoader(shard_dir, 1, 16, seed=0, shuffle=shuffle)
        starts = [int(loader.next_batch()[0][0, 0]) for _ in range(loader.num_windows)]
        assert len(set(starts)) == loader.num_windows
        assert (starts == sorted(starts)) != shuffle


def test_ranks_are_disjoint_and_cover_everything(shard_dir):
    seen = []
    for rank in range(3):
        loader = DataLoader(shard_dir, 1, 16, seed=0, rank=rank, world_size=3)
        seen.append({int(loader.batch(s)[0][0, 0]) for s in range(loader.num_windows)})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == DataLoader(shard_dir, 1, 16).num_windows


def test_split_selection_and_errors(shard_dir):
    assert [p.rsplit("/", 1)[-1] for p in shard_paths(shard_dir, "val")] == ["d_val_000000.bin"]
    val = DataLoader(shard_dir, 2, 16, split="val", shuffle=False)
    assert val.next_batch()[0][0, 0] == 4000
    with pytest.raises(ValueError, match="no window"):
        DataLoader(shard_dir, 2, 500, split="val")
    with pytest.raises(FileNotFoundError):
        shard_paths(shard_dir, "test")
