"""Checkpoints: safetensors for arrays, JSON for everything else, written atomically. No pickle.

A checkpoint is a directory
    <run>/checkpoints/step_00001000/
        model.safetensors       the weights, Hugging Face Llama names
        optimizer.safetensors   AdamW moments `exp_avg.<name>`, `exp_avg_sq.<name>` (absent for weights-only)
        state.json              model config, step, RNG state, loader state, tokenizer reference, optimizer
                                hyperparameters, metrics, and the sha256 of both safetensors files
and two pointer files, `<run>/checkpoints/latest.json` and `best.json`, name the directory to use.

Atomicity: every file is written to a temporary name, fsynced and renamed into place; a checkpoint
directory is assembled under a temporary name and renamed whole; the pointer is replaced last (again
tmp + fsync + rename). A crash at any point leaves the previous pointer, and the checkpoint it names,
intact; a half-written directory keeps its `.tmp` name and is ignored (and cleaned up by the next save).

Loading verifies the checksums and the shapes, so a truncated or corrupt file, or a checkpoint of
another model, gives a `CheckpointError` that says which file and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

FORMAT_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write data to path via a temporary file in the same directory, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def _safetensors_bytes(arrays: dict, metadata: dict | None = None) -> bytes:
    from safetensors.numpy import save
    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


def write_safetensors(path: str, arrays: dict, metadata: dict | None = None) -> str:
    """Atomically write arrays as safetensors; returns the file's sha256."""
    data = _safetensors_bytes(arrays, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_safetensors(path: str, expected_sha256: str | None = None) -> dict:
    """name -> NumPy array; CheckpointError on a missing, corrupt or tampered file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 does not match the one recorded "
                              f"in {STATE_FILE} (truncated or modified after saving)")
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except Exception as error:   # SafetensorError, OSError, ValueError: all mean "not a readable file"
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {error}") from None


def save_checkpoint(checkpoint_dir: str, step: int, model, optimizer=None, state: dict | None = None,
                    keep_last: int = 2, best: bool = False, write_latest: bool = True) -> str:
    """Write `checkpoint_dir/step_{step:08d}/` atomically and point latest.json (and best.json) at it.

    `state`: JSON-able extras (config, RNG, loader state, tokenizer reference, metrics, ...).
    Keeps the newest `keep_last` step directories plus the best one; returns the new directory.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    name = f"step_{int(step):08d}"
    final = os.path.join(checkpoint_dir, name)
    for leftover in os.listdir(checkpoint_dir):           # debris of an interrupted save
        if leftover.endswith(".tmp") and os.path.isdir(os.path.join(checkpoint_dir, leftover)):
            shutil.rmtree(os.path.join(checkpoint_dir, leftover), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=name + ".", suffix=".tmp", dir=checkpoint_dir)
    try:
        record = dict(state or {})
        record["format_version"] = FORMAT_VERSION
        record["step"] = int(step)
        record["files"] = {}
        record["files"][MODEL_FILE] = write_safetensors(os.path.join(staging, MODEL_FILE), model.state_dict(),
                                                        {"format": "pt"})
        if optimizer is not None:
            arrays, meta = optimizer.state_dict()
            record["optimizer"] = meta
            record["files"][OPTIMIZER_FILE] = write_safetensors(os.path.join(staging, OPTIMIZER_FILE), arrays)
        atomic_write_json(os.path.join(staging, STATE_FILE), record)
        _fsync_dir(staging)
        if os.path.exists(final):                          # re-saving the same step: replace it
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(checkpoint_dir)
    pointer = {"path": name, "step": int(step)}
    if write_latest:
        atomic_write_json(os.path.join(checkpoint_dir, "latest.json"), pointer)
    if best:
        atomic_write_json(os.path.join(checkpoint_dir, "best.json"), pointer)
    _prune(checkpoint_dir, keep_last)
    return final


def _pointer_target(checkpoint_dir: str, which: str) -> str | None:
    path = os.path.join(checkpoint_dir, f"{which}.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["path"]
    except (ValueError, KeyError, OSError):
        return None


def _prune(checkpoint_dir: str, keep_last: int) -> None:
    steps = sorted(d for d in os.listdir(checkpoint_dir)
                   if d.startswith("step_") and not d.endswith(".tmp") and os.path.isdir(os.path.join(checkpoint_dir, d)))
    protected = {_pointer_target(checkpoint_dir, "latest"), _pointer_target(checkpoint_dir, "best")}
    for d in steps[:-keep_last] if keep_last > 0 else []:
        if d not in protected:
            shutil.rmtree(os.path.join(checkpoint_dir, d), ignore_errors=True)


def resolve_checkpoint(path: str, which: str = "latest") -> str:
    """The checkpoint directory meant by `path`: a step directory, a checkpoints/ directory or a run
    directory (then its latest.json or best.json pointer)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for directory in (path, os.path.join(path, "checkpoints")):
        target = _pointer_target(directory, which) or _pointer_target(directory, "latest")
        if target is not None:
            resolved = os.path.join(directory, target)
            if not os.path.isfile(os.path.join(resolved, STATE_FILE)):
                raise CheckpointError(f"{directory}/{which}.json names {target}, which holds no {STATE_FILE}")
            return resolved
    raise CheckpointError(f"{path} holds no checkpoint (expected {STATE_FILE}, or checkpoints/latest.json "
                          f"in a run directory)")


def read_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_FILE}") from None
    except ValueError as error:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {error})") from None
    if state.get("format_version") != FORMAT_VERSION or "model_config" not in state:
        raise CheckpointError(f"{path} is not a tinygrad_llm checkpoint of format {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str, which: str = "latest", model=None, optimizer=None, dtype=np.float32):
    """Load a checkpoint. Returns (model, state): the model is built from the saved config when `model`
    is None; `optimizer` (if given) gets its moments back. Raises CheckpointError on any mismatch."""
    from .model import GPT, GPTConfig
    from .nn import StateDictError
    directory = resolve_checkpoint(path, which)
    state = read_state(directory)
    files = state.get("files", {})
    weights = read_safetensors(os.path.join(directory, MODEL_FILE), files.get(MODEL_FILE))
    if model is None:
        try:
            model = GPT(GPTConfig.from_dict(state["model_config"]), dtype=dtype)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{directory}: bad model config in {STATE_FILE}: {error}") from None
    elif state["model_config"] != model.config.to_dict():
        different = sorted(k for k in set(state["model_config"]) | set(model.config.to_dict())
                           if state["model_config"].get(k) != model.config.to_dict().get(k))
        raise CheckpointError(f"checkpoint {directory} was saved for a different model config; differing "
                              f"fields: " + ", ".join(f"{k} (checkpoint {state['model_config'].get(k)!r}, "
                                                      f"model {model.config.to_dict().get(k)!r})" for k in different))
    try:
        model.load_state_dict(weights)
    except StateDictError as error:
        raise CheckpointError(f"checkpoint {directory} does not fit the model:\n{error}") from None
    if optimizer is not None:
        if OPTIMIZER_FILE not in files:
            raise CheckpointError(f"checkpoint {directory} holds no optimizer state (saved weights-only); "
                                  f"it cannot be resumed exactly")
        moments = read_safetensors(os.path.join(directory, OPTIMIZER_FILE), files[OPTIMIZER_FILE])
        try:
            optimizer.load_state_dict(moments, state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {directory}: {error}") from None
    state["directory"] = directory
    return model, state
