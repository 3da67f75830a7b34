"""``kvtier bench cluster``: many instances. One module per part, each with
``run(args) -> dict`` and ``table(result) -> str``: ``routing`` (KV-aware router vs
round-robin), ``pd`` (prefill/decode split) and ``transfer`` (peer-to-peer KV)."""

PARTS = ("routing", "pd", "transfer")
