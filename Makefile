# The two commands of the README. Each does its own set-up (idempotent).
.PHONY: demo test test-fast setup bench bench-serve bench-report

demo:
	scripts/setup.sh
	.venv/bin/kvtier demo

# One test worker per core, at most 4 (each runs its own vLLM instances on its own core;
# see tests/conftest.py). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test:
	scripts/setup.sh --services
	.venv/bin/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

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
