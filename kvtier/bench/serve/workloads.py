"""The two serving workloads of ``kvtier bench serve``, as plain request lists.

Prompts are token ids (sent as ``prompt: [ids]`` to ``/v1/completions``), so
every configuration sees exactly the same tokens and outputs can be compared
token by token. Everything is seeded: the same arguments give the same run.

- **long-doc-qa**: ``docs`` documents of ``doc_tokens`` tokens, each asked
  ``questions`` questions. Round 0 asks each document its first question
  (cold for everyone: the KV is computed and, with a KV layer, stored); the
  later rounds ask the remaining questions, documents interleaved, so with
  the documents' total KV larger than the engine's own KV space vLLM's prefix
  cache keeps losing each document before it is asked again.
- **multi-round-qa**: ``users`` conversations, each opening with a shared
  system prompt and a user-specific context (e.g. an agent's tool output),
  then ``rounds`` turns: each turn's prompt is the whole history (system
  prompt, context, previous questions and answers) plus a new question of
  ``turn_tokens`` tokens. Users send in round-robin order, each after its
  previous answer plus a think time. Most of every prompt is a prefix of the
  user's next prompt, as in agentic traces.

On a real model (``--shape smollm2``), long-doc-qa asks real questions about
real documents instead: each document is a Python standard-library module's
source of ``doc_tokens`` tokens in the model's chat template, each question
one of :data:`QUESTIONS`, and an answer ends at the model's end of turn (at
most ``max_tokens``): what follows it is free continuation, more sensitive to
any change than the answer.

The assistant answers placed into the history are fixed synthetic text of
``answer_tokens`` tokens, not the engine's own output, so every prompt is
known up front and is the same for every configuration (a KV layer stores
prompt chunks only, so this does not change what can hit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.testing.models import make_document


@dataclass(frozen=True)
class Turn:
    """One request: a prompt of token ids and how many tokens to generate."""

    prompt: list[int]
    max_tokens: int
    round: int
    user: int = 0  # the document (long-doc-qa) or the conversation (multi-round-qa)
    stop_at_eos: bool = False  # a real model's answer ends at its end of turn


@dataclass
class Workload:
    """Requests grouped by who sends them: ``users[u]`` is sent in order, each turn
    after the previous one's answer plus ``think_time_s``. Senders are served
    round-robin, so the run goes round by round (every sender's turn 0, then 1...)."""

    name: str
    users: list[list[Turn]]
    think_time_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        """Total requests of the run."""
        return sum(len(u) for u in self.users)

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt (for the server's ``--max-model-len``)."""
        return max(len(t.prompt) for u in self.users for t in u)


@dataclass(frozen=True)
class LongDocQA:
    """Sizes of long-doc-qa (see the module docstring)."""

    docs: int = 8
    doc_tokens: int = 8000
    questions: int = 3
    question_tokens: int = 32
    max_tokens: int = 16

    def build(self, model_dir: str, seed: int = 0, real: bool = False) -> Workload:
        """One sender per document, asking its questions in order (``real``: real
        documents and questions in the model's chat template)."""
        if real:
            return self._build_real(model_dir, seed)
        docs = [make_document(model_dir, self.doc_tokens, seed * 1000 + 100 + d)
                for d in range(self.docs)]
        users = [[Turn(docs[d] + make_document(model_dir, self.question_tokens,
                                               seed * 1000 + 500 + q), self.max_tokens, q, d)
                  for q in range(self.questions)] for d in range(self.docs)]
        return Workload("long-doc-qa", users, settings=dict(vars(self)))


    def _build_real(self, model_dir: str, seed: int) -> Workload:
        from transformers import AutoTokenizer

        from kvtier.testing.smollm2 import chat_prompt

        tok = AutoTokenizer.from_pretrained(model_dir)
        users = []
        for d in range(self.docs):
            name = MODULES[(seed + d) % len(MODULES)]
            doc = module_text(tok, name, self.doc_tokens)
            users.append([Turn(chat_prompt(model_dir, QUESTIONS[(seed + q) % len(QUESTIONS)]
                                           .format(name=name), doc, tok),
                               self.max_tokens, q, d, stop_at_eos=True)
                          for q in range(self.questions)])
        return Workload("long-doc-qa", users, settings={**vars(self), "real": True})


MODULES = ("textwrap", "shlex", "calendar", "heapq", "getopt", "fnmatch", "colorsys", "bisect",
           "string", "glob", "tempfile", "argparse", "random", "statistics", "difflib", "csv")
"""Standard-library modules whose source is a real model's long document."""
QUESTIONS = ("What does the {name} module above do? Answer in one sentence.",
             "Name one function defined in the code above.",
             "Which modules does the code above import?",
             "Is the code above written in Python? Answer yes or no.")
"""Questions a real model is asked about each document, in turn."""


def module_text(tok: Any, name: str, tokens: int, start: int = 0) -> str:
    """About ``tokens`` tokens (from token ``start`` on) of the source of standard-library
    module ``name``."""
    import importlib
    import inspect

    ids = tok(inspect.getsource(importlib.import_module(name))).input_ids
    return tok.decode(ids[start:start + tokens])


@dataclass(frozen=True)
class MultiRoundQA:
    """Sizes of multi-round-qa (see the module docstring)."""

    users: int = 6
    rounds: int = 4
    system_tokens: int = 2000
    context_tokens: int = 10000
    turn_tokens: int = 300
    answer_tokens: int = 200
    max_tokens: int = 32
    think_time_s: float = 1.0

    def build(self, model_dir: str, seed: int = 0) -> Workload:
        """Each user's turns, in order; the history grows by a question and an answer."""
        base = seed * 100_000
        system = make_document(model_dir, self.system_tokens, base + 1)
        users = []
        for u in range(self.users):
            history = system + make_document(model_dir, self.context_tokens, base + 10 + u)
            turns = []
            for r in range(self.rounds):
                question = make_document(model_dir, self.turn_tokens, base + 1000 + 100 * u + r)
                turns.append(Turn(history + question, self.max_tokens, r, u))
                answer = make_document(model_dir, self.answer_tokens, base + 5000 + 100 * u + r)
                history = history + question + answer
            users.append(turns)
        return Workload("multi-round-qa", users, self.think_time_s, settings=dict(vars(self)))


WORKLOADS = {"long-doc-qa": LongDocQA, "multi-round-qa": MultiRoundQA}
