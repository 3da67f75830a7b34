# The two commands of the README. Each does its own set-up (idempotent).
.PHONY: demo test test-fast setup bench bench-serve bench-report

demo:
	scripts/setup.sh --demo
	.venv/bin/kvtier demo

test:
	scripts/setup.sh --services
	.venv/bin/python -m pytest -q -ra $(PYTEST_ARGS)

# Unit tests only: no vLLM, no servers (seconds).
test-fast:
	scripts/setup.sh
	.venv/bin/python -m pytest -q -m "not vllm and not redis" $(PYTEST_ARGS)

bench:
	scripts/setup.sh --services
	.venv/bin/kvtier bench engine
	.venv/bin/kvtier bench tiers

# Serving benchmarks at --quick size: vLLM alone, kvtier, vLLM native offloading, LMCache.
bench-serve:
	scripts/setup.sh --demo
	scripts/setup_peer_lmcache.sh
	.venv/bin/kvtier bench serve --workload long-doc-qa --quick
	.venv/bin/kvtier bench serve --workload multi-round-qa --quick

# Rerun every benchmark and rewrite docs/benchmarks.md (BENCH_ARGS=--quick for the short run).
bench-report:
	scripts/setup.sh --demo --services
	scripts/setup_peer_lmcache.sh
	.venv/bin/kvtier bench report $(BENCH_ARGS)
