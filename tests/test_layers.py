"""DESIGN.md's layer rule: a layer imports only itself and the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import kvtier

ROOT = Path(kvtier.__file__).parent
LAYERS = {"errors": 0, "config": 0, "keys": 1, "codecs": 2, "tiers": 3, "store": 4,
          "engine": 5, "connectors": 6, "control": 7, "cli": 8}
NO_TORCH = {"keys", "tiers", "store"}  # codecs may use torch where it works on tensors
NO_ENGINE = {"keys", "codecs", "tiers", "store"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_layers_import_only_upwards() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == ROOT:
            continue
        layer = layer_of(path)
        assert layer in LAYERS, f"{path} is in no layer of DESIGN.md"
        for mod in imports(path):
            top = mod.split(".")
            if top[0] == "kvtier" and len(top) > 1:
                target = top[1]
                if LAYERS[target] > LAYERS[layer]:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
            if layer in NO_TORCH and top[0] == "torch":
                bad.append(f"{path.relative_to(ROOT)} imports torch")
            if layer in NO_ENGINE and top[0] == "vllm":
                bad.append(f"{path.relative_to(ROOT)} imports vllm")
    assert not bad, "\n".join(bad)
