"""kvtier: a KV cache layer for LLM inference.

Keeps the attention KV of prompts, in chunks, in CPU memory, on local disk and
in a shared Redis/Valkey store, and hands it back to the engine (vLLM) when a
later request shares the prefix. See docs/architecture.md for the layers.
"""

__version__ = "0.1.0"
