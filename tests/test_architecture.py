"""The import graph of `export`: layers, no loops, nothing imports upward.

The layers (docs/architecture.md) are the contract that keeps the toolkit extensible: a format, a
runtime or a deployment target is added in its own layer and registered, never by teaching a
lower layer about a higher one. The command registry (`export.commands`, `export.cli`) sits on
top and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "export"

# (module prefix, layer), most specific prefix wins; low layers may not import high ones.
LAYERS: tuple[tuple[str, int], ...] = (
    # 0 core: the model description and pure functions over it (no files, no torch)
    ("export", 0), ("export.errors", 0), ("export.fields", 0), ("export.progress", 0), ("export.process", 0),
    ("export.spec", 0), ("export.mapping", 0), ("export.tensors", 0), ("export.sharding", 0),
    ("export.layout", 0), ("export.rope", 0), ("export.quantization", 0), ("export.fp8", 0),
    ("export.card", 0), ("export.deployment_plan", 0),
    ("export.deploy", 0),
    # 1 storage: files we read and write (safetensors, manifests, engine dirs, tokenizers, outputs)
    ("export.io", 1), ("export.manifest", 1), ("export.engine_dir", 1), ("export.rank_weights", 1),
    ("export.hf_code", 1),
    # 2 formats and transforms: HF <-> TRT-LLM <-> ONNX, fusion of weights, the source registry
    ("export.sources", 2), ("export.trtllm", 2), ("export.onnx", 2), ("export.synthetic", 2),
    ("export.fusion.fuse", 2), ("export.fusion.fp8_fuse", 2), ("export.fusion.plan", 2), ("export.fusion.card", 2),
    # 3 runtimes: the reference engine and its registry (torch, onnx)
    ("export.runtime", 3), ("export.onnx.backend", 3), ("export.onnx.fast_backend", 3),
    # 4 checks and studies that run a runtime
    ("export.checks", 4), ("export.fusion", 4), ("export.quantize", 4),
    # 5 serving: Triton repositories, the server, the client
    ("export.triton", 5), ("export.chat", 5),
    # 6 apps: the demo and the commands (the command registry may import anything)
    ("export.demo", 6), ("export.commands", 6), ("export.cli", 6), ("export.__main__", 6),
)


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if "models" not in rel.parts:  # the demo checkpoints' copies of hf_code
            out[name] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of `export` this file imports (at any depth: a deferred import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known}


GRAPH = {m: imports(p, modules()) for m, p in modules().items()}


def test_the_table_names_only_modules_that_exist():
    """A renamed module must be renamed here too, or its layer silently falls back to its parent's."""
    assert [p for p, _ in LAYERS if p not in GRAPH] == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    up = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert up == [], f"{module} (layer {layer(module)}) imports higher layers: {up}"


def pkg(m: str) -> str:
    return ".".join(m.split(".")[:2])


def test_no_import_loops():
    """Between packages (export.runtime, export.trtllm, ...), not only modules: a loop between two
    packages is what makes them one thing in practice."""
    edges = {(pkg(a), pkg(b)) for a, bs in GRAPH.items() for b in bs if pkg(a) != pkg(b)}
    loops = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert loops == []
