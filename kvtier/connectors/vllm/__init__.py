"""kvtier as a vLLM v1 KV connector (out of tree, no patch to vLLM).

    KVTransferConfig(kv_connector="KvtierConnector",
                     kv_connector_module_path="kvtier.connectors.vllm", ...)

``connector`` (the class vLLM creates, in both roles), ``scheduler`` (the scheduler
side: lookups, load and save plans), ``worker`` (the worker side: KV tensors, loads,
saves), ``meta`` (what the scheduler sends the workers and back), ``keys`` (what goes
into keys, what bypasses kvtier, what is refused at start-up), ``async_loads``
(background loads and prefetch), ``layerwise`` (loads a layer at a time),
``surfaces`` (stats, Prometheus metrics, KV events).
"""

from kvtier.connectors.vllm.connector import KvtierConnector
from kvtier.connectors.vllm.worker import ENGINE_READY_HOOKS, NAMESPACE_HOOKS

__all__ = ["ENGINE_READY_HOOKS", "KvtierConnector", "NAMESPACE_HOOKS"]
