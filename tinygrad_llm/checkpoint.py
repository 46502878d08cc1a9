"""Checkpoints: safetensors for arrays, JSON for everything else, written atomically. No pickle.

A checkpoint is a directory
    <run>/checkpoints/step_00001000/
        model.safetensors       the weights, Hugging Face Llama names
        optimizer.safetensors   AdamW moments `exp_avg.<name>`, `exp_avg_sq.<name>` (absent for weights-only)
        state.json              model config, step, RNG state, loader state, tokenizer reference, optimizer
                                hyperparameters, metrics, the sha256 of both safetensors files and
                                of its own content (`state_sha256`: an edited state.json is refused)
and two pointer files, `<run>/checkpoints/latest.json` and `best.json`, name the directory to use.

Atomicity: every file is written to a temporary name, fsynced and renamed into place; a checkpoint
directory is assembled under a temporary name and renamed whole; the pointer is replaced last (again
tmp + fsync + rename). A crash at any point leaves the previous pointer, and the checkpoint it names,
intact; a half-written directory keeps its `.tmp` name and is ignored (and cleaned up by the next save).

Loading verifies the checksums, the fields of state.json, the shapes and the values (floating point,
finite), so a truncated, corrupt or crafted file, or a checkpoint of another model, gives a
`CheckpointError` that says which file and what is wrong. `state.json` must list the sha256 of every
safetensors file it uses; the tokenizer file a run refers to is copied into the run and checksummed too
(`run_tokenizer_path`).

Recovery: when `latest.json` is missing (a crash inside the first save, or a lost file), the newest step
directory whose files all verify is used instead, and the debris of interrupted saves (`*.tmp`) is
removed by the next save or resume.

Testing hook: TINYGRAD_LLM_CRASH_AT=<point>[@<n>] kills the process with SIGKILL the n-th time (default
1st) a save passes the named point (`staged_model`, `staged`, `renamed`, `pointed`), so crash tests can
stop a save exactly where they want.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

FORMAT_VERSION = 2          # 2: state.json carries the sha256 of its own content; 1 (older runs) still loads
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
RUN_TOKENIZER_FILE = "tokenizer.json"     # the run's own copy of a tokenizer file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


_crash_counts: dict = {}


def _crash_point(name: str) -> None:
    """Kill this process with SIGKILL when TINYGRAD_LLM_CRASH_AT names this point (see the module docstring)."""
    wanted = os.environ.get("TINYGRAD_LLM_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def require_field(container, name: str, kind, where: str):
    """container[name], checked to be of `kind` (a type or tuple); CheckpointError naming `where` and the field."""
    if not isinstance(container, dict) or name not in container:
        raise CheckpointError(f"{where} has no field {name!r}")
    value = container[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckpointError(f"{where}: field {name!r} must be {'an' if names[0] in 'aeiou' else 'a'} {names}, "
                              f"got {type(value).__name__} {value!r:.60}")
    return value


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}"
        count /= 1024
    return f"{count:.3g} PiB"


def parameter_count(config: dict) -> int:
    """Parameters of a GPT with this config dict, computed before anything is allocated."""
    d, layers, vocab = int(config["d_model"]), int(config["n_layers"]), int(config["vocab_size"])
    heads = int(config["n_heads"])
    kv_dim = (int(config.get("n_kv_heads") or heads)) * (d // max(heads, 1))
    per_layer = d * (d + 2 * kv_dim) + d * d + 3 * d * int(config["ffn_hidden"]) + 2 * d
    return vocab * d * (1 if config.get("tie_embeddings") else 2) + layers * per_layer + d


def check_memory(needed_bytes: float, what: str) -> None:
    """ValueError when `needed_bytes` exceeds this machine's physical memory (before allocating it)."""
    available = physical_memory_bytes()
    if available and needed_bytes > available:
        raise ValueError(f"{what} needs {format_bytes(needed_bytes)}, more than this machine's "
                         f"{format_bytes(available)} of memory")


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
    remove_debris(checkpoint_dir)
    staging = tempfile.mkdtemp(prefix=name + ".", suffix=".tmp", dir=checkpoint_dir)
    try:
        record = dict(state or {})
        record["format_version"] = FORMAT_VERSION
        record["step"] = int(step)
        record["files"] = {}
        record["files"][MODEL_FILE] = write_safetensors(os.path.join(staging, MODEL_FILE), model.state_dict(),
                                                        {"format": "pt"})
        _crash_point("staged_model")
        if optimizer is not None:
            arrays, meta = optimizer.state_dict()
            record["optimizer"] = meta
            record["files"][OPTIMIZER_FILE] = write_safetensors(os.path.join(staging, OPTIMIZER_FILE), arrays)
        atomic_write_json(os.path.join(staging, STATE_FILE), seal_state(record))
        _fsync_dir(staging)
        _crash_point("staged")
        if os.path.exists(final):                          # re-saving the same step: replace it
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(checkpoint_dir)
    _crash_point("renamed")
    pointer = {"path": name, "step": int(step)}
    if write_latest:
        atomic_write_json(os.path.join(checkpoint_dir, "latest.json"), pointer)
    if best:
        atomic_write_json(os.path.join(checkpoint_dir, "best.json"), pointer)
    _crash_point("pointed")
    _prune(checkpoint_dir, keep_last)
    return final


def remove_debris(checkpoint_dir: str) -> list:
    """Delete what interrupted saves left in `checkpoint_dir` (`*.tmp` directories and files); returns their names."""
    removed = []
    if not os.path.isdir(checkpoint_dir):
        return removed
    for leftover in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, leftover)
        if not leftover.endswith(".tmp"):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(leftover)
    return removed


def _pointer_target(checkpoint_dir: str, which: str, strict: bool = True) -> str | None:
    """The step directory name a pointer file names; None when the file is absent. A malformed pointer
    is a CheckpointError naming the file and the field (or None with strict=False, for pruning)."""
    path = os.path.join(checkpoint_dir, f"{which}.json")
    if not os.path.isfile(path):
        return None
    try:
        try:
            with open(path, encoding="utf-8") as f:
                pointer = json.load(f)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{path} is corrupt (not valid JSON: {error})") from None
        if not isinstance(pointer, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(pointer).__name__}")
        target = require_field(pointer, "path", str, path)
        if not target.startswith("step_") or os.path.basename(target) != target or target.endswith(".tmp"):
            raise CheckpointError(f"{path}: field 'path' must name a step directory next to it, got {target!r:.60}")
        return target
    except CheckpointError:
        if strict:
            raise
        return None


def _prune(checkpoint_dir: str, keep_last: int) -> None:
    steps = sorted(d for d in os.listdir(checkpoint_dir)
                   if d.startswith("step_") and not d.endswith(".tmp") and os.path.isdir(os.path.join(checkpoint_dir, d)))
    protected = {_pointer_target(checkpoint_dir, "latest", strict=False),
                 _pointer_target(checkpoint_dir, "best", strict=False)}
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
    for directory in (path, os.path.join(path, "checkpoints")):
        recovered = newest_verified_checkpoint(directory)      # latest.json lost, or a crash before it was written
        if recovered is not None:
            return recovered
    raise CheckpointError(f"{path} holds no checkpoint (expected {STATE_FILE}, or checkpoints/latest.json "
                          f"in a run directory)")


def state_digest(state: dict) -> str:
    """sha256 of a state's content, its own `state_sha256` field left out (canonical JSON, sorted keys)."""
    content = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal_state(state: dict) -> dict:
    """The state with `state_sha256` set, as save_checkpoint writes it (so an edited state.json is refused)."""
    return dict(state, state_sha256=state_digest(state))


def newest_verified_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest `step_*` directory in checkpoint_dir whose state.json reads and whose files match their
    recorded sha256; None when there is none."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = sorted((d for d in os.listdir(checkpoint_dir) if d.startswith("step_") and not d.endswith(".tmp")
                    and os.path.isdir(os.path.join(checkpoint_dir, d))), reverse=True)
    for name in steps:
        directory = os.path.join(checkpoint_dir, name)
        try:
            state = read_state(directory)
            for file_name, digest in state["files"].items():
                if _sha256(os.path.join(directory, file_name)) != digest:
                    raise CheckpointError(file_name)
        except (CheckpointError, OSError):
            continue
        return directory
    return None


def read_state(checkpoint: str) -> dict:
    """state.json of a checkpoint directory, with the fields every reader needs checked: format_version,
    step, model_config and files (the sha256 of each safetensors file; a checkpoint without them is
    refused rather than loaded unverified)."""
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_FILE}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {error})") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(state).__name__}")
    version = state.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise CheckpointError(f"{path} is not a tinygrad_llm checkpoint of format 1 or {FORMAT_VERSION} "
                              f"(field 'format_version' is {version!r:.40})")
    if version == FORMAT_VERSION:
        digest = require_field(state, "state_sha256", str, path)
        if digest != state_digest(state):
            raise CheckpointError(f"{path} was modified after saving: its content does not match its field "
                                  f"'state_sha256'")
    require_field(state, "model_config", dict, path)
    step = require_field(state, "step", int, path)
    if step < 0:
        raise CheckpointError(f"{path}: field 'step' must be non-negative, got {step}")
    files = require_field(state, "files", dict, path)
    if MODEL_FILE not in files:
        raise CheckpointError(f"{path}: field 'files' has no sha256 for {MODEL_FILE}; the weights cannot be verified")
    for name, digest in files.items():
        if name not in (MODEL_FILE, OPTIMIZER_FILE):
            raise CheckpointError(f"{path}: field 'files' names an unknown file {name!r:.60}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise CheckpointError(f"{path}: field 'files.{name}' must be a sha256 hex string, got {digest!r:.70}")
    if "tokenizer" in state and not isinstance(state["tokenizer"], dict):
        raise CheckpointError(f"{path}: field 'tokenizer' must be an object, got {type(state['tokenizer']).__name__}")
    return state


def check_arrays(arrays: dict, where: str) -> None:
    """CheckpointError for integer, boolean or non-finite arrays, naming the tensor."""
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise CheckpointError(f"{where}: tensor {name} has dtype {array.dtype}; weights must be floating point")
        if not np.isfinite(array).all():
            raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")


def load_checkpoint(path: str, which: str = "latest", model=None, optimizer=None, dtype=np.float32):
    """Load a checkpoint. Returns (model, state): the model is built from the saved config when `model`
    is None; `optimizer` (if given) gets its moments back. Raises CheckpointError on any mismatch."""
    from .model import GPT, GPTConfig
    from .nn import StateDictError
    directory = resolve_checkpoint(path, which)
    state = read_state(directory)
    files = state["files"]
    weights = read_safetensors(os.path.join(directory, MODEL_FILE), files[MODEL_FILE])
    check_arrays(weights, os.path.join(directory, MODEL_FILE))
    if model is None:
        try:
            config = GPTConfig.from_dict(state["model_config"])
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{directory}: bad model config in {STATE_FILE}: {error}") from None
        expected, held = parameter_count(config.to_dict()), sum(int(a.size) for a in weights.values())
        try:
            check_memory(expected * np.dtype(dtype).itemsize, f"the model of {os.path.join(directory, STATE_FILE)}")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        if expected != held:                # checked before building a model of a crafted size
            raise CheckpointError(f"{os.path.join(directory, STATE_FILE)}: field 'model_config' describes "
                                  f"{expected:,} parameters but {MODEL_FILE} holds {held:,}")
        model = GPT(config, dtype=dtype)
    elif (saved := {**GPTConfig.field_defaults(), **state["model_config"]}) != model.config.to_dict():
        different = sorted(k for k in set(saved) | set(model.config.to_dict())
                           if saved.get(k) != model.config.to_dict().get(k))
        raise CheckpointError(f"checkpoint {directory} was saved for a different model config; differing "
                              f"fields: " + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, "
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
        check_arrays(moments, os.path.join(directory, OPTIMIZER_FILE))
        require_field(state, "optimizer", dict, os.path.join(directory, STATE_FILE))
        try:
            optimizer.load_state_dict(moments, state["optimizer"])
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint {directory}: {error}") from None
    state["directory"] = directory
    return model, state


# ---------------------------------------------------------------------------------------------- tokenizer
def _run_dir_of(directory: str) -> str:
    """<run>/checkpoints/step_N -> <run>."""
    return os.path.dirname(os.path.dirname(os.path.abspath(directory)))


def tokenizer_file_of(state: dict, directory: str) -> str | None:
    """The tokenizer file a checkpoint's state refers to, verified; None for a character vocabulary
    (held in the state itself). The file must be the run's own copy (`run_file`, a plain name inside the
    run directory, found wherever the run was moved) or the recorded `path`, and match the recorded
    sha256. A reference without a sha256 (older runs) is accepted only inside the run directory."""
    where = os.path.join(directory, STATE_FILE)
    ref = require_field(state, "tokenizer", dict, where)
    kind = require_field(ref, "type", str, where + " field 'tokenizer'")
    if kind == "char":
        return None
    if kind != "file":
        raise CheckpointError(f"{where}: field 'tokenizer.type' must be 'char' or 'file', got {kind!r:.40}")
    run_dir = _run_dir_of(directory)
    digest = ref.get("sha256")
    if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
        raise CheckpointError(f"{where}: field 'tokenizer.sha256' must be a sha256 hex string, got {digest!r:.70}")
    candidates = []
    run_file = ref.get("run_file")
    if run_file is not None:
        if not isinstance(run_file, str) or os.path.basename(run_file) != run_file or run_file in ("", ".", ".."):
            raise CheckpointError(f"{where}: field 'tokenizer.run_file' must be a file name inside the run, "
                                  f"got {run_file!r:.60}")
        candidates.append(os.path.join(run_dir, run_file))
    path = ref.get("path")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise CheckpointError(f"{where}: field 'tokenizer.path' must be a path, got {path!r:.60}")
        inside = os.path.realpath(path).startswith(os.path.realpath(run_dir) + os.sep)
        if digest is not None or inside:
            candidates.append(path)
    if not candidates:
        raise CheckpointError(f"{where}: field 'tokenizer' names no file inside the run and no sha256 to check "
                              f"{path!r:.60} against; pass --tokenizer FILE")
    for candidate in candidates:
        if os.path.isfile(candidate):
            if digest is not None and _sha256(candidate) != digest:
                raise CheckpointError(f"tokenizer file {candidate} does not match the sha256 recorded in {where} "
                                      f"(modified or replaced after the run was created)")
            return os.path.abspath(candidate)
    raise CheckpointError(f"the checkpoint's tokenizer file is missing (looked at {', '.join(candidates)}); "
                          f"pass --tokenizer FILE")


def run_tokenizer_path(checkpoint: str, which: str = "latest") -> str | None:
    """The verified tokenizer file of a run (any path resolve_checkpoint accepts: run, checkpoints/ or
    step directory); None when the run uses a character vocabulary stored in its state. This is the
    file an export may copy: never anything a crafted state.json points at outside the run."""
    directory = resolve_checkpoint(checkpoint, which)
    return tokenizer_file_of(read_state(directory), directory)


def tokenizer_from_state(state: dict, directory: str):
    """The tokenizer a checkpoint was trained with (a CharVocab from the state, or its verified file)."""
    from .tokenizer import CharVocab, load_tokenizer
    where = os.path.join(directory, STATE_FILE)
    ref = require_field(state, "tokenizer", dict, where)
    if ref.get("type") == "char":
        chars = require_field(ref, "chars", str, where + " field 'tokenizer'")
        specials = ref.get("special_tokens", [])
        try:
            return CharVocab.from_dict({"type": "char", "chars": chars, "special_tokens": specials},
                                       where + " field 'tokenizer'")
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    path = tokenizer_file_of(state, directory)
    try:
        return load_tokenizer(path)
    except ValueError as error:
        raise CheckpointError(f"the checkpoint's tokenizer: {error}") from None
