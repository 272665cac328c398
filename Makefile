# ParaFort Proxy — the two commands a new machine needs are `make demo` and `make test`.
# Every target installs what it needs first (scripts/bootstrap.sh: PostgreSQL 15 via apt, .venv via pip).

VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: demo test lint unit integration bench setup clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/parafort-proxy demo

# The test command: lint, type-check, then every test against real PostgreSQL clusters.
test: setup lint
	$(VENV)/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy

unit: setup
	$(VENV)/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(VENV)/pytest -m integration $(PYTEST_ARGS)

# The benchmarks (docs/performance.md): pgbench vs PgBouncer and Pgpool-II, idle-client memory, classification
# cost; about 15 minutes. BENCH_ARGS=--quick for a short pass.
BENCH_ARGS ?=
bench: setup
	@scripts/bootstrap.sh bench
	$(VENV)/python -m bench all $(BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache *.egg-info build proxy/protocol/scan.c proxy/protocol/scan*.so
