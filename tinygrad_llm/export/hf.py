"""The Hugging Face `LlamaForCausalLM` directory: weights, config, tokenizer, chat template; and back.

    export_hf(model, tokenizer, "exported/", card=text)     # writes the files below
    model, tokenizer, info = import_hf("exported/")          # the inverse, exact

Files written:
    config.json              LlamaForCausalLM hyperparameters (hf_config)
    model.safetensors        float32 weights under their Hugging Face names (ours already are)
    tokenizer.json           the tokenizer for `tokenizers` / `PreTrainedTokenizerFast` (export/hf_tokenizer.py)
    tokenizer_config.json    bos / eos / pad, no BOS added, and the chat template (tokenizer.CHAT_TEMPLATE)
                             when the vocabulary has the chat tokens (has_chat_tokens)
    special_tokens_map.json  the same special tokens, for older readers
    generation_config.json   bos / eos / pad ids
    README.md                the model card, when one is given (export/card.py)

Weights: the parameter names and (out, in) layouts are Hugging Face's, so they are written as they are;
with tied embeddings `lm_head.weight` is left out and `tie_word_embeddings` is true (what
`save_pretrained` does). RoPE: Hugging Face Llama uses the same rotate-half pairing and θ, so q_proj and
k_proj rows are not permuted (GGUF needs a permutation, export/gguf_file.py).

Special tokens: `<|endoftext|>` (when the vocabulary has it) is bos, eos and pad: documents were joined
with it placed before each one, so it is also what starts a text; no BOS is added when encoding (our
`sample` adds none). With the chat tokens present, generation also stops at `<|end|>`.

Every file is written atomically (temporary name, fsync, rename). Exporting into a directory that already
holds files needs `force=True`, which replaces the files of the same names and leaves others alone.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..checkpoint import atomic_write_bytes, atomic_write_json, write_safetensors
from ..tokenizer import CHAT_ROLES, CHAT_TEMPLATE
from .hf_tokenizer import HFTokenizerError, special_tokens, tokenizer_from_hf_json, tokenizer_json

EOT, END_OF_TURN = "<|endoftext|>", "<|end|>"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md")


class ExportError(ValueError):
    """A model, tokenizer or directory that cannot be exported or imported as asked."""


def special_roles(tokenizer) -> dict:
    """{"bos", "eos", "pad", "end_of_turn"} -> (name, id) or None, from the tokenizer's special tokens."""
    names = special_tokens(tokenizer)
    eot = (EOT, names[EOT]) if EOT in names else None
    end = (END_OF_TURN, names[END_OF_TURN]) if END_OF_TURN in names else None
    return {"bos": eot, "eos": eot, "pad": eot, "end_of_turn": end}


def has_chat_tokens(tokenizer) -> bool:
    """Whether the vocabulary holds the role tokens and <|end|> that CHAT_TEMPLATE writes. Without them the
    template's text would be encoded as plain characters the model never saw as turns, so it is left out."""
    names = special_tokens(tokenizer)
    return all(f"<|{role}|>" in names for role in CHAT_ROLES) and END_OF_TURN in names


def hf_config(config, tokenizer=None) -> dict:
    """The config.json fields of LlamaForCausalLM for a GPTConfig."""
    roles = special_roles(tokenizer) if tokenizer is not None else {"bos": None, "eos": None, "pad": None}
    ids = {role: value[1] if value else None for role, value in roles.items()}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": float(config.attention_dropout),
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }


def tokenizer_files(tokenizer, max_seq_len: int) -> dict:
    """file name -> JSON content of tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    generation_config.json."""
    roles = special_roles(tokenizer)
    name = {role: value[0] if value else None for role, value in roles.items()}
    token_id = {role: value[1] if value else None for role, value in roles.items()}
    content = tokenizer_json(tokenizer)
    others = [entry["content"] for entry in content["added_tokens"] if entry["content"] not in name.values()
              or entry["content"] == name["end_of_turn"]]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "bos_token": name["bos"], "eos_token": name["eos"], "pad_token": name["pad"], "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(entry["id"]): {key: value for key, value in entry.items() if key != "id"}
                                 for entry in content["added_tokens"]},
    }
    if has_chat_tokens(tokenizer):
        config["chat_template"] = CHAT_TEMPLATE
    if others:
        config["additional_special_tokens"] = others
    special_map = {role + "_token": name[role] for role in ("bos", "eos", "pad") if name[role] is not None}
    if others:
        special_map["additional_special_tokens"] = others
    stops = [token_id[role] for role in ("eos", "end_of_turn") if token_id[role] is not None]
    generation = {"bos_token_id": token_id["bos"], "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
                  "pad_token_id": token_id["pad"]}
    return {"tokenizer.json": content, "tokenizer_config.json": config, "special_tokens_map.json": special_map,
            "generation_config.json": generation}


def check_output_dir(out_dir: str, force: bool) -> None:
    """Refuse a non-empty directory (or a path that is a file) unless force."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ExportError(f"{out_dir} is not empty; pass --force to write into it (files of the same names are "
                          f"replaced)")


def export_hf(model, tokenizer, out_dir: str, card: str | None = None, force: bool = False) -> dict:
    """Write the Hugging Face directory (see the module docstring); returns the config.json dict."""
    if tokenizer is None:
        raise ExportError("the run has no tokenizer to export; pass --tokenizer FILE")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size} embedding rows")
    check_output_dir(out_dir, force)
    try:
        files = tokenizer_files(tokenizer, model.config.max_seq_len)
    except HFTokenizerError as error:
        raise ExportError(str(error)) from None
    os.makedirs(out_dir, exist_ok=True)
    weights = {name: np.asarray(array, dtype=np.float32) for name, array in model.state_dict().items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), weights, {"format": "pt"})
    for name, content in files.items():
        atomic_write_json(os.path.join(out_dir, name), content)
    config = hf_config(model.config, tokenizer)
    atomic_write_json(os.path.join(out_dir, "config.json"), config)     # last: its presence means complete
    if card is not None:
        atomic_write_bytes(os.path.join(out_dir, "README.md"), card.encode("utf-8"))
    return config


# ---------------------------------------------------------------------------------------------- import
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except FileNotFoundError:
        raise ExportError(f"{path} not found") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return content


def gpt_config_from_hf(config: dict, path: str = "config.json"):
    """A GPTConfig from a LlamaForCausalLM config.json; ExportError names what does not fit our model."""
    from ..model import GPTConfig
    if config.get("model_type") != "llama":
        raise ExportError(f"{path}: model_type {config.get('model_type')!r} is not 'llama'")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None}
    for key, expected in unsupported.items():
        if config.get(key, expected) != expected:
            raise ExportError(f"{path}: {key} = {config[key]!r} is not supported (only {expected!r})")
    if config.get("pretraining_tp", 1) != 1:
        raise ExportError(f"{path}: pretraining_tp must be 1")
    try:
        heads = int(config["num_attention_heads"])
        gpt = GPTConfig(vocab_size=int(config["vocab_size"]), d_model=int(config["hidden_size"]),
                        n_layers=int(config["num_hidden_layers"]), n_heads=heads,
                        n_kv_heads=int(config.get("num_key_value_heads") or heads),
                        ffn_hidden=int(config["intermediate_size"]),
                        max_seq_len=int(config["max_position_embeddings"]),
                        rope_theta=float(config.get("rope_theta", 10000.0)),
                        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                        tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    except KeyError as error:
        raise ExportError(f"{path} has no field {error.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise ExportError(f"{path}: {error}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != gpt.head_dim:
        raise ExportError(f"{path}: head_dim {head_dim} is not hidden_size / num_attention_heads ({gpt.head_dim}), "
                          f"which tinygrad_llm's model assumes")
    return gpt


def _read_weights(hf_dir: str) -> dict:
    from safetensors.numpy import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards or any(os.path.basename(shard) != shard for shard in shards):
            raise ExportError(f"{index}: weight_map must name shard files in {hf_dir}")
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ExportError(f"{hf_dir} holds no model.safetensors (nor model.safetensors.index.json)")
    weights = {}
    for shard in shards:
        try:
            weights.update(load_file(os.path.join(hf_dir, shard)))
        except Exception as error:   # SafetensorError, OSError: the file is not readable safetensors
            if "bfloat16" in str(error):
                raise ExportError(f"{os.path.join(hf_dir, shard)} holds bfloat16 weights, which NumPy cannot read; "
                                  f"save the model in float32 or float16 first") from None
            raise ExportError(f"{os.path.join(hf_dir, shard)} is not a valid safetensors file: {error}") from None
    return weights


def import_hf(hf_dir: str):
    """(model, tokenizer, info) from a Hugging Face Llama directory (config.json, safetensors, tokenizer.json).

    Weights of any float dtype NumPy reads become float32 (bfloat16 where ml_dtypes is loaded, else refused). `info` holds the
    config.json dict. ExportError for anything that does not fit our model or tokenizer."""
    from ..model import GPT
    from ..nn import StateDictError
    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir} is not a directory")
    config = _read_json(os.path.join(hf_dir, "config.json"))
    gpt_config = gpt_config_from_hf(config, os.path.join(hf_dir, "config.json"))
    try:
        tokenizer = tokenizer_from_hf_json(_read_json(os.path.join(hf_dir, "tokenizer.json")))
    except HFTokenizerError as error:
        raise ExportError(f"{os.path.join(hf_dir, 'tokenizer.json')}: {error}") from None
    if tokenizer.vocab_size > gpt_config.vocab_size:
        raise ExportError(f"tokenizer.json has {tokenizer.vocab_size} ids but config.json's vocab_size is "
                          f"{gpt_config.vocab_size}")
    weights = _read_weights(hf_dir)
    if gpt_config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    for name, array in list(weights.items()):
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":        # ml_dtypes' bfloat16 has kind "V"
            raise ExportError(f"weight {name} has dtype {array.dtype}; only floating point weights are imported")
        weights[name] = array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ExportError(f"weight {name} holds NaN or infinite values")
    model = GPT(gpt_config)
    expected = set(model.state_dict())            # with tied embeddings the head is not listed apart
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ExportError(f"{hf_dir}: the weights do not fit the config (missing {missing[:4]}, unexpected "
                          f"{extra[:4]})")
    try:
        model.load_state_dict(weights)
    except StateDictError as error:
        raise ExportError(f"{hf_dir}: {error}") from None
    return model, tokenizer, {"config": config}
