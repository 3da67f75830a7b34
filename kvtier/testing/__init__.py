"""Layer 8: running real things, shared by the tests, the benchmarks and the demo.

- :mod:`~kvtier.testing.models`: local random-weight models and a tokenizer (no model hub);
- :mod:`~kvtier.testing.offline`: one vLLM instance (offline ``LLM``) in a fresh process;
- :mod:`~kvtier.testing.vllm_cpu`: the settings every vLLM-CPU run shares (dtype, threads, memory);
- :mod:`~kvtier.testing.redis_proc`: throwaway ``redis-server`` processes (one node or a cluster);
- :mod:`~kvtier.testing.procs`: ports, bounded waits, a child's JSON result.

Nothing in the product layers imports this package.
"""
