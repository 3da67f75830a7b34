"""Layer 7: the router's view of a request's prompt tokens, as vLLM would see them.

- ``/v1/completions``: a string prompt is tokenized with the model folder's
  tokenizer (special tokens added, as vLLM does); token ids are taken as they
  are; a batch (a list of prompts) is routed by its first prompt.
- ``/v1/chat/completions``: the messages through the tokenizer's chat template
  (``add_generation_prompt``, as vLLM's default).

Without a tokenizer (no ``--model-path``) only token-id prompts have tokens;
other requests are routed by load alone.
"""

from __future__ import annotations

import threading
from typing import Any


class PromptTokens:
    """Tokenizes prompts with one model folder's tokenizer (loaded on first use)."""

    def __init__(self, model_path: str | None) -> None:
        self.model_path = model_path
        self._tok: Any = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.model_path)
            return self._tok

    def load(self) -> None:
        """Load now (start-up), so a bad folder fails early."""
        if self.model_path:
            self._tokenizer()

    def of(self, path: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, or None when they cannot be known here."""
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            if not self.model_path or not isinstance(messages, list):
                return None
            try:
                ids = self._tokenizer().apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True)
            except Exception:  # an unusual message shape: route by load
                return None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str) and self.model_path:
            return list(self._tokenizer()(prompt)["input_ids"])
        return None
