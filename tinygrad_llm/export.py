"""Export to the Hugging Face `LlamaForCausalLM` layout: config.json + model.safetensors.

The parameter names and (out, in) layouts already are Hugging Face's, so the weights are written as
they are. With tied embeddings `lm_head.weight` is left out and `tie_word_embeddings` is true (what
`save_pretrained` does). Then, with transformers installed:

    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained("exported/")

RoPE: Hugging Face Llama uses the same rotate-half pairing and θ (`rope_theta`), so no permutation of
q_proj/k_proj rows is needed. The tokenizer is not converted; its file is copied next to the weights
when it is a file (`tinygrad_tokenizer.json`) for reference.
"""
from __future__ import annotations

import json
import os
import shutil

from .checkpoint import atomic_write_json, write_safetensors


def hf_config(config, eot_id=None) -> dict:
    """The config.json fields of LlamaForCausalLM for a GPTConfig."""
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
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def export_hf(model, out_dir: str, eot_id=None, tokenizer_path: str | None = None) -> dict:
    """Write out_dir/config.json and out_dir/model.safetensors (float32); returns the config dict."""
    os.makedirs(out_dir, exist_ok=True)
    weights = {name: array.astype("float32") for name, array in model.state_dict().items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), weights, {"format": "pt"})
    config = hf_config(model.config, eot_id)
    atomic_write_json(os.path.join(out_dir, "config.json"), config)
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id, "max_length": model.config.max_seq_len}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=1)
    if tokenizer_path and os.path.isfile(tokenizer_path):
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tinygrad_tokenizer.json"))
    return config
