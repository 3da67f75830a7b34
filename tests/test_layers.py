"""The layer rule (docs/architecture.md): a layer imports only itself and the layers above it.

The product (layers 1-7) never imports ``bench``, ``testing`` or ``cli``;
``bench`` and ``testing`` (8) may import the product, and ``bench`` may use
``testing`` (not the other way round); ``cli`` (9) imports anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvtier

ROOT = Path(kvtier.__file__).parent
LAYERS = {"errors": 0, "config": 0, "net": 0, "threads": 0, "keys": 1, "codecs": 2, "tiers": 3,
          "transfer": 3, "store": 4, "engine": 5, "connectors": 6, "control": 7, "cluster": 7,
          "testing": 8, "bench": 8, "cli": 9}
NOT_FROM = {"testing": {"bench"}}  # same layer, but only one way
# codecs may use torch where it works on tensors
NO_TORCH = {"net", "keys", "tiers", "transfer", "store"}
NO_ENGINE = {"net", "keys", "codecs", "tiers", "transfer", "store"}


def layer_of(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).parts
    return rel[0].removesuffix(".py")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; kvtier uses absolute imports")
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in root.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == root:
            continue
        layer = layer_of(path, root)
        if layer not in LAYERS:
            bad.append(f"{path.relative_to(root)} is in no layer of LAYERS (docs/architecture.md)")
            continue
        for mod in imports(path):
            top = mod.split(".")
            if top[0] == "kvtier" and len(top) > 1:
                target = top[1]
                if LAYERS[target] > LAYERS[layer] or target in NOT_FROM.get(layer, ()):
                    bad.append(f"{path.relative_to(root)} imports {mod}")
            if layer in NO_TORCH and top[0] == "torch":
                bad.append(f"{path.relative_to(root)} imports torch")
            if layer in NO_ENGINE and top[0] == "vllm":
                bad.append(f"{path.relative_to(root)} imports vllm")
    return bad


def test_layers_import_only_upwards() -> None:
    bad = violations()
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_product_module_importing_bench(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "x.py").write_text("from kvtier.bench.engine import run\n")
    (tmp_path / "testing").mkdir()
    (tmp_path / "testing" / "y.py").write_text("import kvtier.bench.serve\n")
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / "z.py").write_text("import torch\nfrom kvtier.cli import main\n")
    assert sorted(violations(tmp_path)) == [
        "store/x.py imports kvtier.bench.engine", "testing/y.py imports kvtier.bench.serve",
        "tiers/z.py imports kvtier.cli", "tiers/z.py imports torch"]


def test_no_module_is_too_long_to_read() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"modules over 350 lines (split them): {long}"


def test_no_undefined_names() -> None:
    """Names used but never defined or imported (pyflakes): a merge or a move that
    drops an import fails here, not in a vLLM worker at start-up."""
    from pyflakes import api, messages
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self) -> None:
            self.found: list[str] = []

        def flake(self, message: object) -> None:
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal,
                                    messages.UndefinedExport)):
                self.found.append(str(message))

        def syntaxError(self, *args: object) -> None:  # noqa: N802 (pyflakes' API)
            self.found.append(f"syntax error: {args}")

        def unexpectedError(self, *args: object) -> None:  # noqa: N802
            self.found.append(f"unreadable: {args}")

    rep = Collect()
    api.checkRecursive([str(ROOT)], rep)
    assert not rep.found, rep.found
