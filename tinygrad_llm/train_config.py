"""The training configuration: `TrainConfig`, its checks, and reading it from a dict or a TOML file.

The model's fields (d_model, n_layers, ... but not vocab_size, which the tokenizer gives, nor
max_seq_len, which is seq_len) are taken from `GPTConfig` with its defaults, so a field added to the
model appears here, in the TOML keys and as a `tinygrad-llm train` flag without being written twice.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass

from . import backend
from .model import GPTConfig

MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig)
                     if f.name not in ("vocab_size", "max_seq_len") and f.default is not MISSING
                     and isinstance(f.default, (bool, int, float, str)))
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass
class TrainOptions:
    """Everything but the model's fields (see TrainConfig)."""
    # data
    data: str = ""                    # prepared shard directory, a .txt file (char-level), or "" (built-in corpus)
    tokenizer: str = ""               # tokenizer file for a shard directory without vocab.json
    val_fraction: float = 0.1         # for a .txt file: the tail share used for validation
    # optimisation
    batch_size: int = 12
    seq_len: int = 64
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1         # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # 0 disables clipping
    max_bad_steps: int = 5            # consecutive non-finite steps that stop the run
    spike_sigma: float = 3.0          # a loss this many standard deviations over the recent window diverged (0: off)
    spike_window: int = 50            # steps in that window
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    keep_last: int = 2
    sample_tokens: int = 0            # print a sample of this many tokens at the end (0: none)
    sample_prompt: str = "\n"
    # run
    seed: int = 1337
    out_dir: str = "runs/default"
    device: str = "cpu"
    dtype: str = "float32"            # parameter dtype
    precision: str = "fp32"           # GPU mixed-precision policy: fp32, tf32, bf16, fp16 (tinygrad_llm.precision)
    resume: bool = False
    progress: bool = True
    zero: bool = False                # under mpiexec: shard the AdamW state over the ranks (ZeRO stage 1)
    threads_plan: str = "auto"        # CPU threads: auto (measured, cached), pool, blas, single (tinygrad_llm.threading_plan)

    def __post_init__(self):
        # `--dtype fp32|tf32|bf16|fp16` names a mixed-precision policy (the GPU issue's spelling): the
        # parameters then stay float32 and the policy decides what the matmuls run in.
        if self.dtype in PRECISIONS:
            self.precision, self.dtype = self.dtype, "float32"

    def validate(self) -> None:
        problems = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{spec.name} must be a finite number, got {value}")
        positive = ("d_model", "n_layers", "n_heads", "ffn_hidden", "batch_size", "seq_len", "grad_accum",
                    "max_steps", "eval_interval", "eval_iters", "log_interval", "max_bad_steps", "spike_window")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "n_kv_heads", "keep_last", "sample_tokens", "eps",
                     "spike_sigma"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be non-negative, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.attention_dropout < 1.0:
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.dtype not in ("float32", "float64", "float16", "bfloat16"):
            problems.append(f"dtype must be float32, float64, float16 or bfloat16 (parameters) or fp32, tf32, "
                            f"bf16 or fp16 (a precision policy), got {self.dtype!r}")
        try:
            backend.normalize_device(self.device)
        except ValueError as error:
            problems.append(str(error))
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be fp32, tf32, bf16 or fp16, got {self.precision!r}")
        if self.threads_plan not in ("auto", "pool", "blas", "single"):
            problems.append(f"threads_plan must be auto, pool, blas or single, got {self.threads_plan!r}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig this configuration trains, for a tokenizer of `vocab_size` ids."""
        return GPTConfig(vocab_size=vocab_size, max_seq_len=self.seq_len,
                         **{name: getattr(self, name) for name in MODEL_FIELDS})


_model_defaults = {f.name: f.default for f in fields(GPTConfig)}
TrainConfig = make_dataclass(
    "TrainConfig", [(name, type(_model_defaults[name]), field(default=_model_defaults[name])) for name in MODEL_FIELDS],
    bases=(TrainOptions,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = ("What `train` runs: TrainOptions (data, optimisation, evaluation, run) plus the model's "
                       "fields of GPTConfig (" + ", ".join(MODEL_FIELDS) + ").")

CONFIG_FIELDS = {f.name: f for f in fields(TrainConfig)}


def config_from_dict(values: dict, base=None):
    """A TrainConfig from a flat dict (or TOML sections, flattened), with type checks and unknown-key errors."""
    if not isinstance(values, dict):
        raise ValueError(f"a configuration must be a table of keys, got {type(values).__name__}")
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):        # [model], [train], [data] ... sections
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(map(str, unknown))}")
    merged = asdict(base) if base is not None else {}
    for key, value in flat.items():
        kind = type(getattr(TrainConfig, key))
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} must be a number, got {value!r}")
            value = float(value)
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        merged[key] = value
    config = TrainConfig(**merged)
    config.validate()
    return config


def load_toml(path: str) -> dict:
    """A TOML file as a dict. `path` may also name a bundled config: "shakespeare_char" or "small_bpe"."""
    try:
        import tomllib                          # Python 3.11+
    except ImportError:                         # pragma: no cover - older Pythons
        try:
            import tomli as tomllib
        except ImportError:
            raise RuntimeError("TOML config files need Python 3.11+ (tomllib) or `pip install tomli`") from None
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{path}.toml")
    if not os.path.exists(path) and os.path.sep not in path and os.path.isfile(bundled):
        path = bundled
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
