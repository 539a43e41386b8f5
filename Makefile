# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	@echo "casa: creating $(VENV) and installing $(TORCH) and casa's dependencies (once; about 2 minutes on a fresh machine)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --progress-bar off "$(TORCH)" -e ".[dev]" | grep -E "^(Collecting|Successfully installed)" | cut -c1-100
	touch $@

.PHONY: install test test-gpu demo bench bench-update
install: $(VENV)/.installed

# Tests run in one worker per core (pytest-xdist): about 5 minutes on 2 cores, 8 in one process.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n auto

# On a machine with a CUDA GPU: the `gpu` tests (backends, bf16 training, cached decode on CUDA).
# flash-attn is installed only where a prebuilt wheel exists; otherwise its tests skip and flex is used.
test-gpu: install
	$(PY) -m pip install -q --only-binary=:all: flash-attn || echo "casa: no flash-attn wheel here; flash tests will skip (FlexAttention covers CUDA)"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m gpu

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/casa demo

# The attention benchmark into runs/bench/; `make bench-update` rewrites the committed figures in benchmarks/.
bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/casa bench attention --json runs/bench/attention.json --plot runs/bench/attention.png

bench-update: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/casa bench attention --json benchmarks/attention.json --plot benchmarks/attention.png
