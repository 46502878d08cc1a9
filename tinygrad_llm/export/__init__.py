"""Export to the formats other runtimes load unchanged, and import back.

    hf.py            the Hugging Face LlamaForCausalLM directory (weights, config, tokenizer files,
                     chat template) and `import_hf`, its exact inverse
    hf_tokenizer.py  our tokenizers as `tokenizers` JSON (tokenizer.json), and back
    gguf_file.py     a GGUF file for llama.cpp (f32, f16, q8_0, q4_0) through the `gguf` package
    card.py          the model card (README.md), filled from the run's own files

The command line is `tinygrad-llm export` / `tinygrad-llm import` (tinygrad_llm/cli_export.py).
"""
from .card import model_card, run_facts
from .gguf_file import KINDS, export_gguf, gguf_vocabulary, rope_rows_from_gguf, rope_rows_to_gguf
from .hf import ExportError, check_output_dir, export_hf, hf_config, import_hf, special_roles, tokenizer_files
from .hf_tokenizer import HFTokenizerError, tokenizer_from_hf_json, tokenizer_json

__all__ = ["ExportError", "HFTokenizerError", "KINDS", "check_output_dir", "export_gguf", "export_hf",
           "gguf_vocabulary", "hf_config", "import_hf", "model_card", "rope_rows_from_gguf", "rope_rows_to_gguf",
           "run_facts", "special_roles", "tokenizer_files", "tokenizer_from_hf_json", "tokenizer_json"]
