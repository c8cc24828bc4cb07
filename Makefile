# Two-command setup: `make demo` and `make test` each build everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch lies on local disk for this exact version; any other spec
# may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Tests run in parallel on every core (pytest-xdist); set JOBS=0 to run serially.
JOBS ?= auto

.PHONY: setup data demo demo-quick test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from the Debian package dataset-fashion-mnist (nothing downloads at run time).
data:
	@if ls $(FMNIST_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif [ -n "$$GRADCOMP_DATA" ] && ls $$GRADCOMP_DATA/train-images-idx3-ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST found in $$GRADCOMP_DATA"; \
	else \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "Installing Debian package dataset-fashion-mnist"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: setup data
	$(VENV)/bin/gradcomp demo

demo-quick: setup data
	$(VENV)/bin/gradcomp demo --quick

test: setup data
	$(PY) -m pytest -q -n $(JOBS) tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
