"""``kvtier bench serve``: serving workloads against real ``vllm serve`` processes."""
