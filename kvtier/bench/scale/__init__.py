"""``kvtier bench scale``: what kvtier costs as requests, context length, instances and
data grow, each part beside its baseline in the same run. One module per part, each
with ``run(args) -> dict`` and ``table(result) -> str``: ``scheduler`` (the connector's
scheduler-side cost per engine step, beside vLLM's native ``OffloadingConnector``)."""

PARTS = ("scheduler",)
