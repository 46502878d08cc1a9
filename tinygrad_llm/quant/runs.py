"""Quantized runs: quantize a trained checkpoint's weights, store them safely, load them for inference.

    tinygrad-llm quantize runs/default --type q8_0 --out runs/default-q8_0
    tinygrad-llm sample runs/default-q8_0 --prompt "ROMEO:"     # sample / eval accept quantized runs

A quantized run is a directory
    quantized.json          {"format": "tinygrad_llm-quantized", "format_version", "type", "model_config",
                             "tokenizer", "train_config", "source" (the float checkpoint and its step),
                             "files": {"model.safetensors": sha256}, "bytes_per_parameter", ...}
    model.safetensors       every 2-D weight matrix quantized: Q8_0 / Q4_0 as `<name>.blocks`, ggml's uint8
                            blocks (out, in/32 · bytes), as they go into a GGUF file; INT8 as `<name>.values`
                            int8 (out, in) and `<name>.scale` float32 (out,); the RMSNorm gains stay float32
                            under their own names. The safetensors header's metadata names the format too.
    tokenizer.json          a copy of the run's tokenizer file, its sha256 in quantized.json (character
                            vocabularies live in the JSON)
No pickle anywhere; files are written to a staging directory (fsynced) that is renamed into place whole.
Loading checks the sha256, the metadata, and every array's dtype and shape against the model config,
so a truncated, tampered or mismatched file is a one-line `CheckpointError`.

What is quantized: every weight matrix (q/k/v/o, gate/up/down, the embedding and the output head; a tied
head is stored once). Q8_0 and Q4_0 need each matrix's input size to be a multiple of 32; a model that
is not is refused (no padding), with a pointer to `--type int8`, which quantizes any shape.
`QuantizedModel` is what sample/eval run: KV-cached generation through tinygrad_llm.generate.Decoder, and
`model(ids, targets)` -> (logits, mean cross-entropy) for evaluation (float64 log-sum-exp, no autograd).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

from .. import backend
from ..checkpoint import (CheckpointError, _fsync_dir, _sha256, atomic_write_json, load_checkpoint,
                          read_safetensors, tokenizer_file_of, write_safetensors)
from ..generate import Decoder
from ..model import GPTConfig
from ..tensor import Tensor
from .formats import BLOCK_KINDS, KINDS, QuantFormatError, QuantizedMatrix

FORMAT = "tinygrad_llm-quantized"
FORMAT_VERSION = 1
INFO_FILE, MODEL_FILE, TOKENIZER_FILE = "quantized.json", "model.safetensors", "tokenizer.json"


def is_quantized_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO_FILE))


def quantize_weights(weights: dict, kind: str) -> dict:
    """name -> float array  =>  name -> QuantizedMatrix (2-D weights) or the float32 array (norm gains)."""
    if kind not in KINDS:
        raise QuantFormatError(f"unknown quantization type {kind!r} (choose from {', '.join(KINDS)})")
    if kind in BLOCK_KINDS:
        odd = [f"{name} {tuple(w.shape)}" for name, w in weights.items() if w.ndim == 2 and w.shape[1] % 32]
        if odd:
            raise QuantFormatError(f"{kind} needs every weight's input size to be a multiple of 32 (no padding); "
                                   f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''} are not: use --type int8")
    return {name: QuantizedMatrix.quantize(w, kind) if w.ndim == 2 else np.asarray(w, dtype=np.float32)
            for name, w in weights.items()}


def _arrays(weights: dict) -> dict:
    """The safetensors arrays of quantized weights (the layout in the module docstring)."""
    arrays = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedMatrix) and w.kind == "int8":
            arrays[f"{name}.values"], arrays[f"{name}.scale"] = w.values, w.scale
        elif isinstance(w, QuantizedMatrix):
            arrays[f"{name}.blocks"] = w.blocks()
        else:
            arrays[name] = w
    return arrays


def quantize_run(source: str, kind: str, out_dir: str, which: str = "latest") -> dict:
    """Quantize the checkpoint at `source` (a run, checkpoints/ or step directory) into `out_dir`.
    Returns the quantized.json record. Refuses a quantized source and an existing, non-empty out_dir."""
    if is_quantized_run(source):
        info = read_info(source)
        raise CheckpointError(f"{source} is already a quantized run ({info.get('type')}); quantize the float run "
                              f"it came from ({info.get('source', {}).get('checkpoint', 'unknown')}) instead")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another --out")
    model, state = load_checkpoint(source, which=which)
    weights = {name: backend.to_numpy(p.data) for name, p in model.named_parameters()}
    quantized = quantize_weights(weights, kind)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out_dir)) + ".", suffix=".tmp", dir=parent)
    try:
        tokenizer = dict(state.get("tokenizer") or {})
        if tokenizer.get("type") == "file":       # the run's own verified copy (never a path state.json invents)
            copy = os.path.join(staging, TOKENIZER_FILE)
            shutil.copyfile(tokenizer_file_of(state, state["directory"]), copy)
            tokenizer = {"type": "file", "path": TOKENIZER_FILE, "sha256": _sha256(copy)}
        arrays = _arrays(quantized)
        digest = write_safetensors(os.path.join(staging, MODEL_FILE), arrays, {"format": FORMAT, "quant_type": kind})
        parameters = int(sum(math.prod(w.shape) for w in weights.values()))
        weight_bytes = int(sum(a.nbytes for a in arrays.values()))
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "type": kind,
                "model_config": model.config.to_dict(), "tokenizer": tokenizer,
                "train_config": state.get("train_config", {}),
                "source": {"checkpoint": os.path.abspath(state["directory"]), "step": state.get("step")},
                "parameters": parameters, "weight_bytes": weight_bytes,
                "bytes_per_parameter": weight_bytes / parameters, "files": {MODEL_FILE: digest}}
        atomic_write_json(os.path.join(staging, INFO_FILE), info)
        _fsync_dir(staging)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)                                             # empty (checked above)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return info


def read_info(path: str) -> dict:
    file = os.path.join(path, INFO_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a quantized run (no {INFO_FILE})") from None
    except ValueError as error:
        raise CheckpointError(f"{file} is corrupt (not valid JSON: {error})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} is not a {FORMAT} file of version {FORMAT_VERSION}")
    if info.get("type") not in KINDS or "model_config" not in info:
        raise CheckpointError(f"{file}: unknown quantization type {info.get('type')!r} or no model_config")
    return info


def _expected_names(config: GPTConfig) -> dict:
    """Hugging Face weight name -> its shape, for every weight of a GPT with this config."""
    c, kv, f = config.d_model, config.n_kv_heads * config.head_dim, config.ffn_hidden
    shapes = {"model.embed_tokens.weight": (config.vocab_size, c), "model.norm.weight": (c,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, c)
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        shapes.update({prefix + "input_layernorm.weight": (c,), prefix + "post_attention_layernorm.weight": (c,),
                       prefix + "self_attn.q_proj.weight": (c, c), prefix + "self_attn.k_proj.weight": (kv, c),
                       prefix + "self_attn.v_proj.weight": (kv, c), prefix + "self_attn.o_proj.weight": (c, c),
                       prefix + "mlp.gate_proj.weight": (f, c), prefix + "mlp.up_proj.weight": (f, c),
                       prefix + "mlp.down_proj.weight": (c, f)})
    return shapes


def load_quantized_run(path: str) -> tuple:
    """(QuantizedModel, info) from a quantized run directory; CheckpointError on anything wrong."""
    info = read_info(path)
    try:
        config = GPTConfig.from_dict(info["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: bad model config in {INFO_FILE}: {error}") from None
    file = os.path.join(path, MODEL_FILE)
    arrays = read_safetensors(file, info.get("files", {}).get(MODEL_FILE))
    try:
        weights = weights_from_arrays(config, info["type"], arrays)
    except QuantFormatError as error:
        raise CheckpointError(f"{file} is corrupt: {error}") from None
    tokenizer = dict(info.get("tokenizer") or {})
    if tokenizer.get("type") == "file" and not os.path.isabs(tokenizer.get("path", "")):
        tokenizer["path"] = os.path.join(os.path.abspath(path), tokenizer.get("path", TOKENIZER_FILE))
    info = dict(info, tokenizer=tokenizer, directory=os.path.abspath(path))
    return QuantizedModel(config, info["type"], weights), info


def weights_from_arrays(config: GPTConfig, kind: str, arrays: dict) -> dict:
    """The stored arrays (the layout in the module docstring) -> name -> QuantizedMatrix or float32 array.
    QuantFormatError names the first missing or mis-shaped array. Consumes `arrays`."""
    weights = {}
    for name, shape in _expected_names(config).items():
        try:
            if len(shape) == 1:
                weights[name] = _array(arrays, name, np.float32, shape)
            elif kind == "int8":
                values = _array(arrays, f"{name}.values", np.int8, shape)
                weights[name] = QuantizedMatrix(kind, shape, values, _array(arrays, f"{name}.scale", np.float32, shape[:1]))
            else:
                weights[name] = QuantizedMatrix.from_blocks(arrays.pop(f"{name}.blocks"), kind, shape)
        except KeyError as missing:
            raise QuantFormatError(f"it has no array {missing}") from None
    return weights


def _array(arrays: dict, name: str, dtype, shape) -> np.ndarray:
    array = arrays.pop(name)
    if array.dtype != dtype or tuple(array.shape) != tuple(shape):
        raise QuantFormatError(f"{name} is {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {tuple(shape)}")
    return array


class QuantizedModel:
    """A model whose weight matrices are QuantizedMatrix: inference only (generate, evaluation).

    model(ids, targets=None) -> logits (B, T, V) Tensor, or (logits, loss) with targets; `return_logits`
    False gives (None, loss), as GPT.forward. `inference_weights()` is what generate.Decoder reads.
    """

    def __init__(self, config: GPTConfig, kind: str, weights: dict):
        self.config, self.kind, self.weights = config, kind, weights
        self.training = False
        self._decoder = None

    def inference_weights(self) -> dict:
        weights = dict(self.weights)
        if self.config.tie_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return weights

    @property
    def device(self) -> str:
        return backend.device_of(self.weights["model.norm.weight"])

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def num_parameters(self) -> int:
        return int(sum(math.prod(w.shape) for w in self.weights.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(w.nbytes for w in self.weights.values()))

    def eval(self) -> "QuantizedModel":
        return self

    def train(self, mode: bool = True) -> "QuantizedModel":
        if mode:
            raise RuntimeError("a quantized model cannot be trained: train the float run, then quantize it")
        return self

    def to(self, device=None, dtype=None) -> "QuantizedModel":
        if dtype is not None and np.dtype(dtype) != np.float32:
            raise ValueError("a quantized model computes in float32; it has no other dtype")
        if device is not None:
            device = backend.normalize_device(device)
            self.weights = {name: w.to(device) if isinstance(w, QuantizedMatrix) else backend.to_device(w, device)
                            for name, w in self.weights.items()}
            self._decoder = None
        return self

    def __call__(self, ids, targets=None, return_logits: bool = True, ignore_index: int = -100, **unused):
        if self._decoder is None:
            self._decoder = Decoder(self)
        ids = backend.to_numpy(ids.data if isinstance(ids, Tensor) else ids)
        logits = self._decoder.forward(ids)                                       # (B, T, V) float32
        if targets is None:
            return Tensor(logits)
        targets = backend.to_numpy(targets.data if isinstance(targets, Tensor) else targets).reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)           # (B·T, V)
        keep = targets != ignore_index
        row_max = flat.max(axis=1, keepdims=True)
        lse = row_max[:, 0] + np.log(np.exp(flat - row_max).sum(axis=1))
        picked = flat[np.arange(flat.shape[0]), np.where(keep, targets, 0)]
        loss = Tensor(np.asarray(((lse - picked) * keep).sum() / max(int(keep.sum()), 1), dtype=np.float32))
        return (Tensor(logits) if return_logits else None), loss
