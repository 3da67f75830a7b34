"""``kvtier bench scale``: what kvtier costs as requests, context length, instances and
data grow, each part beside its baseline in the same run. One module per part, each
with ``run(args) -> dict`` and ``table(result) -> str``: ``scheduler`` (the connector's
scheduler-side cost per engine step, beside vLLM's native ``OffloadingConnector``),
``miss`` (no reuse at all: vLLM's own ``bench serve``, kvtier vs vLLM alone),
``beyond`` (a working set three times the CPU budget: kvtier memory+disk vs native
offloading), ``long`` (one 8k to 128k-token document: hit vs cold, load rate vs a
memory copy, per-token cost), ``controller`` (the controller fed by many simulated
instances: ingest, index memory, lookup and routing latency, beside the HTTP floor)."""

PARTS = ("scheduler", "miss", "beyond", "long", "controller")
