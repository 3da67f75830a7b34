# The two commands of the README. Each does its own set-up (idempotent).
.PHONY: demo test test-fast setup bench

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
	scripts/setup.sh
	.venv/bin/kvtier bench engine
	.venv/bin/kvtier bench tiers
