"""The partial builds of the kernel files (kernels/select.cuh) against the launchers' choice of module: every
entry point of a file, preprocessed whole, is also in the module its launcher loads it from (the file
preprocessed with that module's -DSELECT_ flags), and each such module is only part of the file. nvcc's
preprocessor, no GPU; skipped where nvcc is missing (CI has it)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tinygrad_llm.gpu import attention, compiler, norm

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
_ENTRY = re.compile(r'extern "C" __attribute__\(\(global\)\) void (?:__attribute__\(\(launch_bounds\((?:[^()]|\([^()]*\))*\)\)\) )?(\w+)\(')
_seen: dict = {}


def entry_points(filename: str, options=()) -> set:
    """The names of the kernels the file defines once preprocessed with these flags."""
    key = (filename, tuple(options))
    if key not in _seen:
        arch = "sm_90a" if filename == attention.HOPPER_FILE else "sm_80"
        text = subprocess.run([NVCC, "-E", "-std=c++17", f"-arch={arch}", "-I", str(compiler.kernels_dir()), "-x", "cu",
                               *options, str(compiler.kernels_dir() / filename)],
                              capture_output=True, text=True, check=True).stdout
        _seen[key] = set(_ENTRY.findall(" ".join(text.split())))
    return _seen[key]


def _selection_flags(options) -> tuple:
    return tuple(flag for flag in options if flag.startswith("-DSELECT_"))


@pytest.mark.parametrize("filename", [attention.HOPPER_FILE, attention.FORWARD_FILE, attention.BACKWARD_FILE])
def test_every_attention_entry_point_is_in_the_module_its_launcher_loads(filename):
    names = entry_points(filename)
    assert len(names) >= 8
    parts = set()
    for name in sorted(names):
        flags = _selection_flags(attention._module_of(filename, name)["options"])
        assert flags, name
        assert name in entry_points(filename, flags), (name, flags)
        parts.add(flags)
    assert len(parts) >= 3
    for flags in parts:
        assert len(entry_points(filename, flags)) < len(names), flags


def test_every_rms_norm_entry_point_is_in_the_module_of_its_16_bit_dtype_and_pass():
    names = entry_points(norm.FILE)
    assert len(names) >= 16
    modules = {options for _, options, _ in norm.modules("bfloat16") + norm.modules("float16")}
    assert len(modules) == 6
    for name in sorted(names):
        flags = compiler.selection(dtype=norm._low_dtype(name), part=norm._part(name))
        kept = entry_points(norm.FILE, flags)
        assert flags in modules and name in kept and len(kept) < len(names), (name, flags)
        assert all(norm._part(other) == norm._part(name) for other in kept), (name, kept)


def test_a_file_without_selection_flags_builds_whole():
    whole = entry_points(attention.HOPPER_FILE)
    builds = {64: (("forward", "wp2"), ("forward", "wp3"), ("backward", "wk")),
              128: (("forward", "wp2"), ("backward", "wk"))}
    assert {f"attention_{direction}_{dtype}_d{dim}_{build}{variant}"
            for dim in (64, 128) for direction, build in builds[dim]
            for dtype in ("bf16", "fp16") for variant in ("", "_dropout")} == whole


def test_an_unknown_attention_kernel_name_is_refused():
    with pytest.raises(ValueError, match="no attention kernel is named"):
        attention._module_of(attention.FORWARD_FILE, "attention_sideways_bf16_d64")
