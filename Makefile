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

.PHONY: install test demo bench
install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/casa demo

bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/casa bench attention --json benchmarks/attention.json --plot benchmarks/attention.png
