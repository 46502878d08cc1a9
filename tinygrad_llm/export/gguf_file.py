"""GGUF for llama.cpp (and Ollama, LM Studio, llama-cpp-python), written with the `gguf` package.

    export_gguf(model, tokenizer, "model-q8_0.gguf", kind="q8_0")     # kind: f32, f16, q8_0, q4_0

What the file holds:
    general.*                architecture "llama", name, license (when given), file type, quantization version
    llama.*                  context length, embedding length, block count, feed-forward length, head counts,
                             RMSNorm epsilon, RoPE base and dimension count, vocabulary size
    tokenizer.ggml.*         model "gpt2" (byte-level BPE): tokens (byte-level strings, GPT-2's table, the
                             same strings as tokenizer.json), token types (normal; control for special
                             tokens; unused for ids the tokenizer leaves empty), merges, the pre-tokenizer
                             name, bos / eos / eot / pad ids, add_bos false
    tokenizer.chat_template  tinygrad_llm.tokenizer.CHAT_TEMPLATE, when the vocabulary has the chat tokens
    tensors                  llama.cpp's names (gguf's own Llama name map), one per weight

RoPE: our q_proj / k_proj rows use Hugging Face's rotate-half pairing (dimension i with i + D/2 inside a
head); llama.cpp's "llama" architecture rotates adjacent pairs (2i, 2i + 1). So inside every head the rows
are interleaved: new row 2i is old row i and new row 2i + 1 is old row i + D/2 (`rope_rows_to_gguf`;
`rope_rows_from_gguf` undoes it). k_proj is permuted per key/value head.

Types: f32 writes every tensor as float32. f16 writes 2-D weights as float16 and the norm gains as float32
(llama.cpp's own convention). q8_0 / q4_0 write 2-D weights as those blocks (tinygrad_llm.quant, bytes
equal to gguf.quants), the norm gains as float32, and a weight whose rows are not a multiple of 32 as
float16 (blocks are never padded).

Tokenizers GGUF can express: a byte-level BPE split by GPT4_PATTERN (llama.cpp's "llama-bpe"
pre-tokenizer, the same regex written out) or GPT2_PATTERN ("gpt-2"); a custom split regex cannot be
named to llama.cpp and is refused. A character vocabulary becomes a BPE in which an ASCII character is one
byte-level symbol, and the only merges join the bytes of each multi-byte character (`£` is the two
symbols `Â` `£` and the merge "Â £"). An ASCII-only vocabulary has no merges; llama.cpp requires a merges
entry and gguf writes no empty lists, so it gets one placeholder merge of two multi-character strings,
which no symbol can ever match. A vocabulary without <|endoftext|> is refused: llama.cpp falls back to
id 11 as its end-of-text token and would stop generating at whatever token that is.

The file is written under a temporary name in the same directory, fsynced, then renamed.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ..checkpoint import _fsync_dir
from ..quant import quantize_q4_0, quantize_q8_0
from ..tokenizer import CHAT_TEMPLATE, GPT2_PATTERN, GPT4_PATTERN
from .hf import EOT, ExportError, has_chat_tokens, special_roles
from .hf_tokenizer import all_cut_merges, byte_level_text, is_char_vocab, special_tokens

KINDS = ("f32", "f16", "q8_0", "q4_0")
PRE_TOKENIZERS = {GPT4_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}
PLACEHOLDER_MERGE = "<| |>"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package (llama.cpp's writer), an optional extra: "
                          "pip install gguf (or pip install -e .[export])") from None
    return gguf


def rope_rows_to_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half row order -> llama.cpp's adjacent-pair order, inside each of `heads` heads."""
    rows, columns = weight.shape
    half = rows // heads // 2
    pairs = weight.reshape(heads, 2, half, columns).transpose(0, 2, 1, 3)   # (H·D, C) -> (H, D/2, 2, C)
    return pairs.reshape(rows, columns)                                       # (H, D/2, 2, C) -> (H·D, C)


def rope_rows_from_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of rope_rows_to_gguf."""
    rows, columns = weight.shape
    half = rows // heads // 2
    halves = weight.reshape(heads, half, 2, columns).transpose(0, 2, 1, 3)  # (H·D, C) -> (H, 2, D/2, C)
    return halves.reshape(rows, columns)                                      # (H, 2, D/2, C) -> (H·D, C)


def _character_merges(chars) -> list:
    """Merges that join the bytes of each multi-byte character left to right: (b1, b2), (b1b2, b3), ...
    Every symbol llama.cpp starts from is one byte; these merges only ever build prefixes of one UTF-8
    character (text splits never cut a character), so each character in the vocabulary ends up whole."""
    merges = {}                                     # an insertion-ordered set
    for char in chars:
        data = char.encode("utf-8")
        for end in range(2, len(data) + 1):
            merges[f"{byte_level_text(data[:end - 1])} {byte_level_text(data[end - 1:end])}"] = None
    return list(merges)


def gguf_vocabulary(tokenizer, vocab_size: int) -> dict:
    """{"tokens", "types", "merges", "pre"} for the tokenizer.ggml keys; ExportError when GGUF cannot say it."""
    gguf = _gguf()
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size} embedding rows")
    specials = {token_id: name for name, token_id in special_tokens(tokenizer).items()}
    tokens, types = [], []
    if EOT not in specials.values():
        raise ExportError("GGUF cannot express a vocabulary without <|endoftext|>: llama.cpp would take token 11 as "
                          "its end of text and stop there (prepare the data with its end-of-text token; export "
                          "--hf works)")
    if is_char_vocab(tokenizer):
        regular = {index: byte_level_text(char.encode("utf-8")) for index, char in enumerate(tokenizer.chars)}
        merges, pre = _character_merges(tokenizer.chars) or [PLACEHOLDER_MERGE], "default"
    else:
        if tokenizer.pattern not in PRE_TOKENIZERS:
            raise ExportError("GGUF cannot express a custom split pattern: llama.cpp only knows its built-in "
                              "pre-tokenizers (train the tokenizer with pattern 'gpt4' or 'gpt2'; export --hf "
                              "works)")
        regular = {rank: byte_level_text(data) for data, rank in tokenizer.mergeable_ranks().items()}
        merges = [f"{regular[left]} {regular[right]}" for left, right, _ in all_cut_merges(tokenizer)]
        merges = merges or [PLACEHOLDER_MERGE]
        pre = PRE_TOKENIZERS[tokenizer.pattern]
    for token_id in range(vocab_size):
        if token_id in regular:
            tokens.append(regular[token_id])
            types.append(gguf.TokenType.NORMAL)
        elif token_id in specials:
            tokens.append(specials[token_id])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def _tensor_type(gguf, array: np.ndarray, kind: str):
    """(array to write, raw GGML type or None) for one weight under the export kind."""
    if array.ndim == 1 or kind == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if kind == "f16" or array.shape[-1] % 32:
        return np.ascontiguousarray(array, dtype=np.float16), None
    quantize = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}[kind]
    raw = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    return quantize(array), raw


def export_gguf(model, tokenizer, path: str, kind: str = "f16", name: str | None = None, force: bool = False,
                license_id: str | None = None) -> dict:
    """Write `path` as a GGUF file of the given kind; returns {"tensors": {gguf name: type name}, ...}."""
    if kind not in KINDS:
        raise ExportError(f"unknown GGUF type {kind!r}; choose one of {', '.join(KINDS)}")
    if tokenizer is None:
        raise ExportError("the run has no tokenizer to export; pass --tokenizer FILE")
    if os.path.isdir(path):
        raise ExportError(f"{path} is a directory; give the .gguf file to write")
    if os.path.exists(path) and not force:
        raise ExportError(f"{path} already exists; pass --force to replace it")
    gguf = _gguf()
    config = model.config
    vocabulary = gguf_vocabulary(tokenizer, config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(descriptor)
    writer = gguf.GGUFWriter(temporary, "llama")
    written = {}
    try:
        writer.add_name(name or "tinygrad_llm model")
        if license_id:
            writer.add_license(license_id)
        writer.add_file_type(file_types[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.ffn_hidden)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocabulary["pre"])
        writer.add_token_list(vocabulary["tokens"])
        writer.add_token_types(vocabulary["types"])
        writer.add_token_merges(vocabulary["merges"])
        roles = special_roles(tokenizer)
        if roles["bos"]:
            writer.add_bos_token_id(roles["bos"][1])
            writer.add_eos_token_id(roles["eos"][1])
            writer.add_pad_token_id(roles["pad"][1])
        if roles["end_of_turn"]:
            writer.add_eot_token_id(roles["end_of_turn"][1])
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        if has_chat_tokens(tokenizer):
            writer.add_chat_template(CHAT_TEMPLATE)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
        for hf_name, array in model.state_dict().items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise ExportError(f"no GGUF name for weight {hf_name}")
            array = np.asarray(array, dtype=np.float32)
            if hf_name.endswith("self_attn.q_proj.weight"):
                array = rope_rows_to_gguf(array, config.n_heads)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                array = rope_rows_to_gguf(array, config.n_kv_heads)
            data, raw = _tensor_type(gguf, array, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            written[gguf_name] = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for handle in writer.fout or []:
            handle.flush()
            os.fsync(handle.fileno())
        writer.close()
        os.replace(temporary, path)
    except BaseException:
        writer.close()
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_dir(directory)
    return {"tensors": written, "pre": vocabulary["pre"], "eos": roles["eos"]}
