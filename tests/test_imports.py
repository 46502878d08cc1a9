"""The package's layering, read from the source with `ast` (nothing is imported).

Every `import` and `from ... import` in tinygrad_llm/, at module level or inside a function, is an edge
from its module to the module it names (`from . import x` names the submodule x when there is one). The
graph must have no cycle, and the edges that /work/shared/design/README.md forbids must not exist: a lower
layer never imports a higher one, not even lazily.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinygrad_llm"

ENGINE = {"tinygrad_llm.tensor", "tinygrad_llm.backend", "tinygrad_llm.rng", "tinygrad_llm.cpu_threads",
          "tinygrad_llm.native"}
OPS = ("tinygrad_llm.ops", "tinygrad_llm.functional", "tinygrad_llm.gradcheck")
GPU = ("tinygrad_llm.gpu", "tinygrad_llm.precision")
MODEL = ("tinygrad_llm.nn", "tinygrad_llm.model")
DATA = ("tinygrad_llm.data", "tinygrad_llm.tokenizer")
TRAINING = ("tinygrad_llm.train", "tinygrad_llm.optim", "tinygrad_llm.checkpoint")
INFERENCE = ("tinygrad_llm.generate", "tinygrad_llm.export")
FACE = ("tinygrad_llm.cli", "tinygrad_llm.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set:
    """The package modules that `name` imports, anywhere in its file."""
    found = set()
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:           # `import a.b.c` names a.b.c or a parent of it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}

# Imports outside the GPU layer that break the rules today and that other work removes (the engine's lazy
# `Cast`, ops reaching back into functional). The tests below ignore exactly these edges; the last test
# fails once one of them is gone, so that its entry is deleted here too.
KNOWN_VIOLATIONS = {
    ("tinygrad_llm.tensor", "tinygrad_llm.ops.elementwise"),
    ("tinygrad_llm.ops.attention", "tinygrad_llm.functional"),
    ("tinygrad_llm.ops.loss", "tinygrad_llm.functional"),
    ("tinygrad_llm.ops.rope", "tinygrad_llm.functional"),
}


def _edges(name: str) -> list:
    return sorted(target for target in GRAPH[name] if (name, target) not in KNOWN_VIOLATIONS)



def _in(name: str, part) -> bool:
    part = (part,) if isinstance(part, str) else part
    return any(name == p or name.startswith(p + ".") for p in part)


def test_the_graph_is_read():
    assert "tinygrad_llm.gpu" in GRAPH["tinygrad_llm.ops.norm"]
    assert "tinygrad_llm.backend" in GRAPH["tinygrad_llm.gpu.compiler"]
    assert "tinygrad_llm.gpu.attention" in GRAPH["tinygrad_llm.gpu.registry"]


def test_no_module_imports_one_that_imports_it_back():
    # depth-first search for a back edge, iteratively
    state, cycles = {}, []
    for start in sorted(GRAPH):
        if start in state:
            continue
        stack = [(start, iter(_edges(start)))]
        path, state[start] = [start], "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                cycles.append(path[path.index(child):] + [child])
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(_edges(child))))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


FORBIDDEN = [  # (importer, what it must never import, why)
    ("tinygrad_llm.backend", ("tinygrad_llm",), "backend only picks NumPy or CuPy"),
    (tuple(ENGINE), OPS + GPU + MODEL + DATA + TRAINING + INFERENCE + FACE, "the engine knows no op"),
    (OPS, MODEL + DATA + TRAINING + INFERENCE + FACE, "ops sit below the model"),
    (GPU, OPS + MODEL + DATA + TRAINING + INFERENCE + FACE, "kernels never reach above the ops"),
    ("tinygrad_llm.precision", ("tinygrad_llm.gpu",), "the policy holds no GPU code"),
    (MODEL, TRAINING + DATA + INFERENCE + FACE, "the model is below training and data"),
]


@pytest.mark.parametrize("importer,forbidden,why", FORBIDDEN, ids=[f[2] for f in FORBIDDEN])
def test_no_forbidden_import(importer, forbidden, why):
    bad = [f"{name} -> {target}" for name in GRAPH if _in(name, importer)
           for target in _edges(name) if _in(target, forbidden)]
    assert not bad, f"{why}: " + ", ".join(sorted(bad))


def test_known_violations_still_exist():
    gone = sorted(f"{a} -> {b}" for a, b in KNOWN_VIOLATIONS if b not in GRAPH.get(a, ()))
    assert not gone, "no longer imported, delete from KNOWN_VIOLATIONS: " + ", ".join(gone)


def test_importing_the_gpu_package_imports_no_cupy():
    import subprocess
    import sys
    code = "import sys, tinygrad_llm.gpu, tinygrad_llm.precision; print(any(m.startswith('cupy') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=True)
    assert result.stdout.strip() == "False"
