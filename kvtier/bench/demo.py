"""The demo (``kvtier demo``): what kvtier does, in one table.

Embedded defaults: vLLM (CPU) with the kvtier connector, a memory tier and a
local disk tier, nothing else to start. It asks long-document questions on a
first vLLM instance (cold: the KV is computed and stored), shuts it down,
starts a **new** instance on the same disk folder and asks again (warm: the
prompt's KV comes back from kvtier), then prints TTFT cold vs warm per
document, the tokens served from kvtier, and whether the outputs are
identical (greedy token ids; the largest logprob difference is printed).

With the real model (``smollm2``, the default) the documents are real text
that ships with Python (stdlib sources, Python's licence) and the questions
real chat turns, so the answers can be read; a random-weight shape
(``small``, ``tiny``) asks made-up token documents instead.
"""

from __future__ import annotations

import inspect
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Callable

from kvtier.testing.models import PRETRAINED, build_model, make_document
from kvtier.testing.smollm2 import MAX_POSITIONS, chat_prompt
from kvtier.testing.offline import run_instance
from kvtier.testing.vllm_cpu import fast_dtype

Say = Callable[[str], None]
Progress = Callable[[str, dict[str, Any]], None]


def run(args: Any, say: Say = print, progress: Progress | None = None) -> dict[str, Any]:
    """Run both instances; return per-document rows and the setup.

    ``args`` has the options of ``kvtier demo`` as attributes. ``say`` gets
    one line per phase; ``progress(instance, event)`` gets each document as
    it starts and ends (see :func:`~kvtier.testing.offline.run_instance`).
    """
    model = str(Path(args.model)) if args.model else str(build_model(args.shape))
    real = args.model is None and args.shape in PRETRAINED
    folder = Path(args.disk_path or tempfile.mkdtemp(prefix="kvtier-demo-"))
    shutil.rmtree(folder, ignore_errors=True)  # cold must be cold
    max_tokens = args.max_tokens or (48 if real else 16)
    if real:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        asked = documents()[:args.docs]
        requests = [{"prompt": chat_prompt(model, q, text, tok), "max_tokens": max_tokens,
                     "stop_at_eos": True} for _, text, q in asked]
        max_len = MAX_POSITIONS
    else:
        question = make_document(model, 24, seed=999)
        requests = [{"prompt": make_document(model, args.tokens, seed=100 + i) + question,
                     "max_tokens": max_tokens} for i in range(args.docs)]
        max_len = args.tokens + 1024
    kvtier = {"tiers": ["memory", "disk"], "disk.path": str(folder),
              "memory.max_bytes": args.memory}
    dtype = fast_dtype() if args.dtype == "auto" else args.dtype
    spec = {"model": model, "kvtier": kvtier, "rounds": [requests], "sequential": True,
            "max_model_len": max_len, "multiprocess": True, "dtype": dtype}
    sizes = (f"{len(requests)} real documents with a question each" if real
             else f"{args.docs} documents x {args.tokens} tokens")
    say(f"model {model} ({dtype}); {sizes}; "
        f"kvtier tiers: memory {args.memory} + disk {folder}; vLLM's log: {args.log}")
    say("instance 1 (cold): starting vLLM, then computing and storing each document's KV")
    cold = run_instance(spec, log_path=args.log,
                        on_progress=(lambda e: progress("cold", e)) if progress else None)
    say("instance 1 shut down; instance 2 (a new process on the same disk folder): "
        "starting vLLM, then loading each document's KV from kvtier")
    warm = run_instance(spec, log_path=args.log,
                        on_progress=(lambda e: progress("warm", e)) if progress else None)
    rows = []
    for i, (c, w) in enumerate(zip(cold["rounds"][0], warm["rounds"][0])):
        rows.append({"doc": i, "prompt_tokens": len(requests[i]["prompt"]),
                     "ttft_cold_s": c["ttft_s"], "ttft_warm_s": w["ttft_s"],
                     "speedup": c["ttft_s"] / max(w["ttft_s"], 1e-9),
                     "tokens_from_kvtier": w["num_cached_tokens"],
                     "identical": c["token_ids"] == w["token_ids"],
                     "logprob_max_abs_diff": max((abs(x - y) for x, y in
                                                  zip(c["logprobs"], w["logprobs"])), default=0.0)})
        if real:
            rows[-1].update(document=asked[i][0], question=asked[i][2],
                            answer_cold=tok.decode(c["token_ids"], skip_special_tokens=True),
                            answer_warm=tok.decode(w["token_ids"], skip_special_tokens=True))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"model": model, "dtype": dtype, "docs": len(rows), "tokens": args.tokens, "rows": rows,
            "startup_s": [cold["startup_s"], warm["startup_s"]]}


def documents() -> list[tuple[str, str, str]]:
    """``(name, text, question)``: real documents that ship with Python, several thousand
    tokens each (Python's licence is left out where a distribution strips it)."""
    import shlex
    import textwrap

    docs = [("textwrap.py", inspect.getsource(textwrap),
             "What is the default width of TextWrapper?")]
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if licence.is_file():
        docs.append(("Python's LICENSE.txt", licence.read_text(errors="replace"),
                     "Which organization owns the copyright of Python?"))
    docs.append(("shlex.py", inspect.getsource(shlex), "What does the quote function do?"))
    return docs
