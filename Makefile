# Quick start: `make repro` (install, then run the pipeline) and `make test` (install, then the test suite).
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test test-fast test-paper bench-venv

$(INSTALLED): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q pip==25.3
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $(INSTALLED)

repro: $(INSTALLED)
	dvc repro

test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -m "not paper"

# The paper-scale dry runs on the CPU (tests/test_paper_dryrun.py, ~37 min and ~13 GiB; tests/test_paper_dryrun_families.py,
# ~23 min and ~18 GiB each): not part of `make test`.
test-paper: $(INSTALLED)
	$(PYTHON) -m pytest -m paper

test-fast: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -m "not slow and not paper"

# The benchmark extra (benchmarks/bench_trl.py): TRL in a venv of its own inside the repo (git-ignored), so that
# .venv stays exactly as requirements.txt pins it.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: requirements-bench.txt requirements.txt
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q pip==25.3
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -r requirements-bench.txt
	touch $@

bench-venv: $(BENCH_VENV)/.installed
