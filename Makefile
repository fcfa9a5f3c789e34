# Quick start: `make repro` (install, then run the pipeline) and `make test` (install, then the test suite).
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test test-fast test-paper

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
	$(PYTHON) -m pytest -m "not paper"

# The paper-scale dry run on the CPU (tests/test_paper_dryrun.py): ~10 min and ~13 GiB RAM, so not part of `make test`.
test-paper: $(INSTALLED)
	$(PYTHON) -m pytest -m paper

test-fast: $(INSTALLED)
	$(PYTHON) -m pytest -m "not slow and not paper"
