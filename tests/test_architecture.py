"""The one-way import rule that docs/architecture.md states, read from the source itself (every import, those inside
functions included): no cycle, and no module imports one from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first.  A module may import modules of its own layer or of layers below; a new module needs a row here,
# which is the moment to decide where it sits.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "_version", "metrics", "distributed", "tblog", "backends.fast.policy"),
    ("families",),
    ("target_inference",),
    ("config", "models"),
    ("data", "rundir", "checkpoint", "report"),
    ("tasks",),
    ("placement",),
    ("peft_format",),
    ("planning",),
    ("backends",),
    ("build",),
    ("job",),
    ("torch_inference", "exports", "onnx_export"),
    ("onnx_inference",),
    ("predictor",),
    ("finish", "teachers"),
    ("prediction_files", "training"),
    ("search",),
    ("server",),
    ("api",),
    ("cli", "__init__", "__main__"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "loracls").rglob("*.py"):
        parts = p.relative_to(SRC / "loracls").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The loracls modules `path` imports, relative imports resolved, `from X import Y` taken as module X.Y
    where Y is a module."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("loracls"):
                module = node.module.removeprefix("loracls").lstrip(".")
            else:
                continue
            for alias in node.names:
                child = f"{module}.{alias.name}".lstrip(".")
                found.add(child if child in known else module)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("loracls").lstrip(".") for a in node.names if a.name.startswith("loracls")}
    return {m for m in found if m in known and m != name}


def _layer(name: str) -> int:
    # the most specific row wins: backends.fast.policy sits below backends
    best = None
    for i, row in enumerate(LAYERS):
        for entry in row:
            if (name == entry or name.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        pytest.fail(f"module loracls.{name} has no row in LAYERS (tests/test_architecture.py): decide its layer")
    return best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_the_graph_is_read_from_the_source(graph):
    # the reader must see imports inside functions too, or the rule below would pass vacuously
    assert "training" in graph["api"] and "families" in graph["config"]
    assert "data.common" in graph["data.columns"]


def test_imports_point_down_the_layers(graph):
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
