"""The docs are true to the tree.

- docs/architecture.md's module table lists every module under kvtier/ (by its
  backticked path relative to kvtier/, in the first cell of a row), under the
  heading of its layer, and nothing that no longer exists;
- every file the docs name in backticks exists, and every test they name
  (``test_x.py::test_name``) is defined there;
- the repository cites no file outside it (the docs say the rule instead).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvtier"
ARCH = ROOT / "docs" / "architecture.md"
DOCS = (ARCH, ROOT / "docs" / "reliability.md", ROOT / "docs" / "security.md", ROOT / "README.md")
SECTION = "## The tree is the architecture"
LAYER_HEADING = re.compile(r"#{3,}\s+(?:layer\s+)?(\d+)\b", re.IGNORECASE)
MODULE = re.compile(r"`(?:kvtier/)?([\w/]+\.py)`")


def modules(pkg: Path = PKG) -> set[str]:
    """Every module under the package, relative to it; a file with nothing in it (an
    empty ``__init__.py``) is no module to describe."""
    return {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
            if ast.parse(p.read_text()).body}


def layer_of(module: str) -> int | None:
    top = module.split("/")[0].removesuffix(".py")
    return 0 if top == "__init__" else LAYERS.get(top)


def table(text: str) -> dict[str, list[int | None]]:
    """Module -> the layers whose heading it is listed under, from the first cell
    of each table row in the tree section."""
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    rows: dict[str, list[int | None]] = defaultdict(list)
    layer = None
    for line in text[start:end if end >= 0 else None].splitlines():
        if heading := LAYER_HEADING.match(line):
            layer = int(heading[1])
        elif line.startswith("|") and layer is not None:
            for name in MODULE.findall(line.strip().strip("|").split("|")[0]):
                rows[name].append(layer)
    return rows


def table_errors(text: str, pkg: Path = PKG) -> list[str]:
    listed, present = table(text), modules(pkg)
    files = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")}
    bad = [f"kvtier/{m} is missing from the module table of docs/architecture.md"
           for m in sorted(present - set(listed))]
    bad += [f"docs/architecture.md lists kvtier/{m}, which does not exist"
            for m in sorted(set(listed) - files)]
    for m, layers in sorted(listed.items()):
        if len(layers) > 1:
            bad.append(f"docs/architecture.md lists kvtier/{m} {len(layers)} times")
        elif m in present and layers[0] != layer_of(m):
            where = ("in no layer" if layer_of(m) is None else f"in layer {layer_of(m)}")
            bad.append(f"docs/architecture.md lists kvtier/{m} under layer {layers[0]}; "
                       f"it is {where} (tests/test_layers.py LAYERS)")
    return bad


def test_the_module_table_is_the_tree() -> None:
    bad = table_errors(ARCH.read_text())
    assert not bad, "\n".join(bad)


def test_the_check_names_a_missing_a_gone_and_a_misplaced_module(tmp_path: Path) -> None:
    for name in ("keys.py", "tiers/disk/tier.py", "store/hierarchy.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('"""A module."""\n')
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")  # empty: need not be listed
    text = (f"{SECTION}\n\n| # | layer |\n|---|---|\n| 1 | `kvtier/keys.py` |\n\n"
            "### Layer 1: keys\n\n| module | holds |\n|---|---|\n| `keys.py` | keys |\n\n"
            "### Layer 3: tiers\n\n| module | holds |\n|---|---|\n"
            "| `tiers/disk.py` | gone; see `tiers/disk/tier.py` |\n"
            "| `store/hierarchy.py` | misplaced |\n\n## Next section\n\n| `cli/x.py` | |\n")
    assert table_errors(text, tmp_path) == [
        "kvtier/tiers/disk/tier.py is missing from the module table of docs/architecture.md",
        "docs/architecture.md lists kvtier/tiers/disk.py, which does not exist",
        "docs/architecture.md lists kvtier/store/hierarchy.py under layer 3; it is in layer 4 "
        "(tests/test_layers.py LAYERS)"]


# A file (not a URL path such as `/openapi.json`), maybe with a test; or `::test` of the last file.
FILE_REF = re.compile(r"`(\w[\w./-]*\.(?:py|md|json|sh|toml))((?:::\w+)?)`|`::(\w+)`")


def reference_errors(doc: Path) -> list[str]:
    """Backticked files that exist nowhere (as a path from the repository, from kvtier/,
    from tests/, or a module's bare name), tests named after them that are not there,
    and backticked `kvtier/...` folders that are not there."""
    names = {p.name for d in ("kvtier", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    bad, last = [], None
    text, name = doc.read_text(), doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc.name
    bad += [f"{name} names `{d}`, which is no folder"
            for d in re.findall(r"`(kvtier/[\w/]*/)`", text) if not (ROOT / d).is_dir()]
    for m in FILE_REF.finditer(text):
        ref, test = m[1], (m[2] or "").removeprefix("::") or m[3]
        if ref:
            found = [p for p in (ROOT / ref, PKG / ref, ROOT / "tests" / ref, doc.parent / ref)
                     if p.is_file()]
            last = found[0] if found else None
            if not found and ("/" in ref or ref not in names):
                bad.append(f"{name} names `{ref}`, which does not exist")
        if test and last is not None and not re.search(rf"\bdef {test}\b", last.read_text()):
            bad.append(f"{name} names {last.name}::{test}, which is not there")
    return bad


def test_every_file_and_test_the_docs_name_exists() -> None:
    bad = [e for doc in DOCS for e in reference_errors(doc)]
    assert not bad, "\n".join(bad)


def test_the_check_names_a_gone_file_folder_and_test(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("`kvtier/tiers/disk/` `kvtier/tiers/gone/` `tiers/peer_conn.py` `choice.py` "
                   "`/openapi.json` `test_docs.py::test_nope` `::test_the_module_table_is_the_tree`")
    assert reference_errors(doc) == [
        "doc.md names `kvtier/tiers/gone/`, which is no folder",
        "doc.md names `tiers/peer_conn.py`, which does not exist",
        "doc.md names test_docs.py::test_nope, which is not there"]


OUTSIDE = tuple(s.encode() for s in ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared"))


def test_nothing_cites_a_file_outside_the_repository() -> None:
    """Notes kept beside the repository are not shipped with it: a rule the code
    follows is stated where it applies, or in docs/."""
    files = [ROOT / f for f in ("README.md", "Makefile", "pyproject.toml")]
    files += [p for d in ("kvtier", "tests", "docs", "benchmarks", "scripts")
              for p in (ROOT / d).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".png"]
    bad = [f"{p.relative_to(ROOT)} cites {s.decode()}" for p in files if p.is_file()
           for s in OUTSIDE if s in p.read_bytes()]
    assert not bad, "\n".join(bad)
