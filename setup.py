"""Installs tinygrad_llm.

Runtime: numpy and regex. safetensors stores checkpoints (a safe, mmap-able tensor format that never
unpickles), tqdm draws progress bars. CuPy is the optional `gpu` extra (pick the wheel that matches your
CUDA: `pip install -e .[gpu]` installs cupy-cuda12x and ml_dtypes for bf16; on CUDA 13 install cupy-cuda13x yourself).
The top-level kernels/ directory is shipped inside the package as data so that the GPU module can
compile the CUDA sources at first use.
"""
import re
from pathlib import Path

from setuptools import setup, find_packages

# The version is defined once, in tinygrad_llm/__init__.py (CHANGELOG.md names the same number).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "tinygrad_llm" / "__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="tinygrad_llm",
    version=VERSION,
    description="Build a Llama-style LLM from scratch on NumPy: hand-derived autograd, BPE, data pipeline, CUDA kernels",
    packages=find_packages(include=["tinygrad_llm", "tinygrad_llm.*"]) + ["tinygrad_llm.kernels"],
    package_dir={"tinygrad_llm.kernels": "kernels"},      # top-level kernels/ ships as package data
    package_data={"tinygrad_llm": ["configs/*.toml", "serve/page.html", "quant/*.c", "ops/*.c"], "tinygrad_llm.kernels": ["*.cu", "*.cuh"]},
    python_requires=">=3.9",
    install_requires=["numpy>=1.22", "regex>=2022.1.18", "safetensors>=0.4", "tqdm>=4.60",
                      "tomli>=2; python_version < '3.11'"],          # TOML configs (tomllib from 3.11)
    extras_require={
        "gpu": ["cupy-cuda12x>=14", "ml_dtypes>=0.4"],   # CUDA 13 drivers: install cupy-cuda13x instead
        "plot": ["matplotlib>=3.5"],
        "cpu": ["threadpoolctl>=3.1"],                 # the CPU threading plan sets OpenBLAS's threads at run time
        "dist": ["mpi4py>=4", "mpich>=4"],              # data-parallel training: MPI from PyPI wheels
        "book": ["matplotlib>=3.5", "pypandoc-binary>=1.13", "typst>=0.13"],   # pandoc's wheel + Typst: the PDF
        "lm_eval": ["lm-eval[api]>=0.4",   # examples/lm_eval: the reference harness on the same task files
                    "transformers>=4.40"],  # its local-completions model reads the exported tokenizer through it
        "test": ["pytest>=7", "hypothesis>=6.80", "tiktoken>=0.5",    # tiktoken: the id-equality test
                 "mpi4py>=4", "mpich>=4",                            # the 2-rank data-parallel tests
                 "gguf>=0.10",                                   # gguf: llama.cpp's own Q8_0/Q4_0 bytes
                 "tokenizers>=0.19", "jinja2>=3",     # export: tokenizer.json and the chat template read back
                 # the server's tests: its extras, the official OpenAI client, httpx, Selenium for the chat page
                 "starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.20", "better-profanity>=0.7",
                 "httpx>=0.27", "openai>=1.30", "selenium>=4.20"],
        "serve": ["starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.20"],   # tinygrad-llm serve
        "moderation": ["better-profanity>=0.7"],      # the blocklist's maintained word list (MIT)
        "export": ["gguf>=0.10"],                      # llama.cpp's GGUF writer, for `export --gguf`
        "bench": ["tokenizers>=0.15", "tiktoken>=0.5", "datasketch>=1.6"],
        "llamacpp": ["llama-cpp-python>=0.3"],        # benchmarks/decode_llamacpp.py: llama.cpp on our GGUF file
    },
    entry_points={"console_scripts": ["tinygrad-llm=tinygrad_llm.cli:main"]},
)
