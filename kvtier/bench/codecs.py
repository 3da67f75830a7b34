"""``kvtier bench codecs``: every chunk codec on KV from real vLLM runs, beside raw.

Setup, all in one run:

1. **capture**: a fresh vLLM instance (a local model, ``--model``) with the
   kvtier connector on a disk tier (raw) prefills ``--prompts`` documents of
   ``--prompt-tokens`` tokens (``smollm2``: chat questions about stdlib
   sources, real KV of a trained model); its chunk files are real KV.
2. **size and speed**: each codec encodes and decodes every captured chunk
   (median of ``--repeats`` passes, one thread): ratio = raw bytes / encoded
   bytes (payloads; the 128-byte header is the same for all), GB/s of raw bytes.
   Lossless codecs must give back the exact bytes.
3. **outputs**: each codec's encoded chunks are written to the folder under
   the keys of a per-codec tenant salt (``codec-<name>``), in the namespace the
   capture instance reported (a lossy codec's chunks in that namespace's lossy
   codec class: kvtier never serves lossy KV to an instance that did not opt in).
   A fresh vLLM instance then asks every prompt once per lossless codec (salted,
   one request at a time), and one more instance per lossy codec, configured with
   that codec, asks them for it; every request hits its whole chunks from disk,
   decoded by the store's read path. Each codec's greedy tokens and logprobs are
   compared with the raw codec's (the baseline: the same hit, undecoded): token
   agreement = mean share of each answer equal to raw's before its first
   differing token (matching prefix; ``position_agreement``: share of positions
   with the same token; ``exact_match``: share of answers equal to raw's); logprob
   differences over the positions before a prompt's first differing token (after
   it the contexts differ). Lossless codecs must be bitwise equal.

   A last row, ``raw+1ulp``, is the model's own sensitivity: the raw chunks
   with the lowest mantissa bit of half the values flipped at random (about
   the size of the rounding differences between two vLLM CPU code paths).
   Lossy codecs cannot be expected to agree more than this does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kvtier.codecs import ChunkData, Codec, compress, decompress
from kvtier.config import DiskConfig
from kvtier.keys import ChunkHasher, ChunkKey, Namespace
from kvtier.testing.models import PRETRAINED, SHAPES, build_model, make_document
from kvtier.testing.offline import run_instance
from kvtier.tiers.disk import DiskTier

MODEL_ID = "kvtier-bench-codecs"
CHUNK = 256
BITS = {Codec.Q8: 8, Codec.Q4: 4}
NOISE = "noise-1ulp"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; see the module docstring. Returns the result dict."""
    codecs = [Codec[c.strip().upper()] for c in args.codecs.split(",") if c.strip()]
    codecs = [Codec.RAW] + [c for c in codecs if c is not Codec.RAW]
    model = str(build_model(args.model))
    real = args.model in PRETRAINED  # answers end at the end-of-turn token
    prompts = (real_prompts(model, args.prompts, args.prompt_tokens) if args.model in PRETRAINED
               else [make_document(model, args.prompt_tokens, seed) for seed in range(args.prompts)])
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-codecs-", dir=args.work_dir))
    try:
        cfg = {"tiers": ["disk"], "disk.path": str(work / "chunks"), "model_id": MODEL_ID,
               "chunk_size": CHUNK}
        t0 = time.perf_counter()
        # A save runs in the engine step after the one that computed it: the short
        # last request gives the last prompt's saves that step.
        tail = _req(make_document(model, 16, 10_000), None, 1)
        captured = run_instance({"model": model, "kvtier": cfg, "sequential": True,
                                 "rounds": [[_req(p, None, 1) for p in prompts] + [tail]]},
                                timeout_s=args.timeout_s)
        capture_s = time.perf_counter() - t0
        if not captured.get("kvtier_namespace"):
            raise RuntimeError("the capture instance did not report its key namespace")
        hasher = ChunkHasher(Namespace(**captured["kvtier_namespace"]))
        tier = DiskTier(DiskConfig(path=str(work / "chunks")))
        keys, chunks = _captured(tier, hasher, prompts)
        sizes = [_size_and_speed(chunks, c, args.repeats) for c in codecs]
        variants = {c: (lambda ch, c=c: compress(ch, c)) for c in codecs}
        variants[NOISE] = _one_ulp_noise
        for variant, encode in variants.items():
            lossy = variant if isinstance(variant, Codec) and variant.lossy else None
            ns = hasher.namespace if lossy is None else replace(
                hasher.namespace, codec_class=lossy.name.lower())
            salted = ChunkHasher(ns).with_salt(_salt(variant))
            tier.put_many([(k, encode(chunks[key])) for p in prompts
                           for k, key in zip(salted.keys(p), hasher.keys(p))])
        tier.close()
        t0 = time.perf_counter()
        plain = [v for v in variants if not (isinstance(v, Codec) and v.lossy)]
        by_variant = dict(zip(plain, run_instance(
            {"model": model, "kvtier": cfg, "sequential": True,
             "rounds": [[_req(p, _salt(v), args.max_tokens, real) for p in prompts]
                        for v in plain]},
            timeout_s=args.timeout_s)["rounds"]))
        for codec in (c for c in codecs if c.lossy):  # an instance that opted in to it
            (by_variant[codec],) = run_instance(
                {"model": model, "kvtier": {**cfg, "disk.codec": codec.name.lower()},
                 "sequential": True,
                 "rounds": [[_req(p, _salt(codec), args.max_tokens, real) for p in prompts]]},
                timeout_s=args.timeout_s)["rounds"]
        outs = [by_variant[c] for c in codecs] + [by_variant[NOISE]]
        hits_s = time.perf_counter() - t0
        rows = []
        for codec, size, out in zip(codecs, sizes, outs):
            rows.append({"codec": codec.name.lower(), "lossless": codec.lossless,
                         "bits": BITS.get(codec), **size, **_agreement(out, outs[0]),
                         "hit_tokens": sum(r["num_cached_tokens"] for r in out)})
        rows.append({"codec": "raw+1ulp", "lossless": False, "bits": None, "ratio": 1.0,
                     "encode_gbps": None, "decode_gbps": None, "bytes_exact": False,
                     **_agreement(outs[-1], outs[0]),
                     "hit_tokens": sum(r["num_cached_tokens"] for r in outs[-1])})
        full = sum(len(p) // CHUNK * CHUNK for p in prompts)
        setup = {"model": args.model, "shape": vars(SHAPES[args.model]) if args.model in SHAPES
                 else args.model, "prompts": len(prompts),
                 "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                 "stop_at_eos": real,
                 "chunks": len(keys), "chunk_meta": str(next(iter(chunks.values())).meta),
                 "raw_bytes": sum(c.payload.nbytes for c in chunks.values()),
                 "hit_tokens_expected": full, "repeats": args.repeats,
                 "capture_s": round(capture_s, 1), "hits_s": round(hits_s, 1),
                 "baseline": "raw (same run, same hits)"}
        return {"setup": setup, "codecs": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _req(prompt: list[int], salt: str | None, max_tokens: int, stop: bool = False
         ) -> dict[str, Any]:
    """One request; ``stop``: a real model's answer ends at its end-of-turn token (what
    follows it is free continuation, more sensitive to any change than the answer)."""
    return {"prompt": prompt, "salt": salt, "max_tokens": max_tokens, "stop_at_eos": stop}


def _salt(variant: Codec | str) -> str:
    return f"codec-{variant.name.lower()}" if isinstance(variant, Codec) else variant


def _captured(tier: DiskTier, hasher: ChunkHasher, prompts: Sequence[list[int]]
              ) -> tuple[list[ChunkKey], dict[ChunkKey, ChunkData]]:
    """The capture's chunks, by key (private copies)."""
    keys = [k for p in prompts for k in hasher.keys(p)]
    chunks: dict[ChunkKey, ChunkData] = {}
    for key, chunk in zip(keys, tier.get_many(keys)):
        if chunk is None:
            raise RuntimeError(f"chunk {key.hex()} was not stored by the capture instance")
        chunks[key] = ChunkData(chunk.meta, chunk.payload.copy())
        chunk.release()
    return keys, chunks


def _one_ulp_noise(chunk: ChunkData) -> ChunkData:
    """The raw chunk with the lowest bit of half its (2-byte) values flipped, at random."""
    values = chunk.payload.copy().view(np.uint16)
    flip = np.random.default_rng(0).integers(0, 2, values.size, dtype=np.uint16)
    return ChunkData(chunk.meta, (values ^ flip).view(np.uint8))


def _size_and_speed(chunks: dict[ChunkKey, ChunkData], codec: Codec, repeats: int
                    ) -> dict[str, Any]:
    raw = list(chunks.values())
    nbytes = sum(c.payload.nbytes for c in raw)
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc = [compress(c, codec) for c in raw]
        enc_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dec = [decompress(e) for e in enc]
        dec_t.append(time.perf_counter() - t0)
    exact = all(bytes(d.payload) == bytes(c.payload) for d, c in zip(dec, raw))
    if codec.lossless and not exact:
        raise AssertionError(f"{codec.name}: lossless codec did not give the bytes back")
    return {"ratio": round(nbytes / sum(e.payload.nbytes for e in enc), 3),
            "encode_gbps": round(nbytes / statistics.median(enc_t) / 1e9, 3),
            "decode_gbps": round(nbytes / statistics.median(dec_t) / 1e9, 3),
            "bytes_exact": exact}


def real_prompts(model: str, n: int, tokens: int) -> list[list[int]]:
    """``n`` chat questions, each about ``tokens`` tokens of a stdlib module's source."""
    from transformers import AutoTokenizer

    from kvtier.bench.serve.workloads import MODULES, module_text
    from kvtier.testing.smollm2 import chat_prompt

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for i in range(n):
        name = MODULES[i % len(MODULES)]
        doc = module_text(tok, name, tokens, (i // len(MODULES)) * tokens)
        out.append(chat_prompt(model, f"What does the {name} module's code above do?", doc, tok))
    return out


def _agreement(out: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """``token_agreement``: mean share of each answer that matches raw's before the first
    differing token (the matching prefix); ``position_agreement``: share of positions
    with the same token; ``exact_match``: share of answers identical to raw's."""
    same = total = exact = 0
    prefix: list[float] = []
    diffs: list[float] = []
    for a, b in zip(out, base):
        ta, tb = a["token_ids"], b["token_ids"]
        same += sum(x == y for x, y in zip(ta, tb))
        total += len(tb)
        exact += ta == tb
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(tb))
        prefix.append(first / max(1, len(tb)))
        diffs += [abs(x - y) for x, y in zip(a["logprobs"][:first], b["logprobs"][:first])]
    return {"token_agreement": round(statistics.fmean(prefix), 4) if prefix else 1.0,
            "position_agreement": round(same / max(1, total), 4),
            "exact_match": round(exact / max(1, len(base)), 4),
            "max_abs_logprob_diff": max(diffs, default=0.0),
            "mean_abs_logprob_diff": statistics.fmean(diffs) if diffs else 0.0,
            "bitwise_equal": all(a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]
                                 for a, b in zip(out, base))}
