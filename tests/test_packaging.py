"""kvtier from a built wheel (not the editable checkout) works from outside the checkout.

The wheel is built from a copy of the sources, installed with ``--no-deps``
into a fresh venv that sees the project venv's packages (vLLM, torch, ...)
through a ``.pth`` line, and run from a folder outside the checkout, so any
file read by walking up from ``__file__`` into a checkout would fail here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # the test itself lives in the checkout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, wheel): kvtier's wheel installed into a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "kvtier", src / "kvtier",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)], cwd=root)
    (wheel,) = dist.glob("kvtier-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    purelib = Path(run([str(venv / "bin" / "python"), "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=root).strip())
    # A plain path line: the project's packages become importable, but its .pth files
    # (the editable kvtier's finder among them) are not run.
    (purelib / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)], cwd=root)
    return venv, wheel


def run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_kvtier_command_runs_from_the_wheel(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = installed
    kvtier = str(venv / "bin" / "kvtier")
    out = run([kvtier, "--help"], cwd=tmp_path)
    assert "demo" in out and "bench" in out and "model" in out
    assert "--workload" in run([kvtier, "bench", "serve", "--help"], cwd=tmp_path)


def test_connector_imports_from_the_installed_package(installed: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    venv, _ = installed
    code = ("import kvtier, kvtier.connectors.vllm as c, kvtier.control.vllm_plugin, "
            "kvtier.bench.serve.servers, kvtier.testing.offline; "
            "print(kvtier.__file__); print(c.KvtierConnector.__name__)")
    where, name = run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path).split()[-2:]
    assert Path(where).is_relative_to(venv) and name == "KvtierConnector"
    assert not Path(where).is_relative_to(REPO)


def test_wheel_declares_the_vllm_plugin_and_extras(installed: tuple[Path, Path]) -> None:
    _, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata, entry_points = z.read(meta).decode(), z.read(entry).decode()
    assert "kvtier_control = kvtier.control.vllm_plugin:register" in entry_points
    assert "kvtier = kvtier.cli.main:main" in entry_points
    for extra in ("vllm", "redis", "bench", "testing"):
        assert f"Provides-Extra: {extra}" in metadata
    assert not any(n.startswith("tests/") for n in names)
