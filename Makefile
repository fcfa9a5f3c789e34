# Quick start: `make repro` (install, then run the pipeline) and `make test` (install, then the test suite).
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: repro test test-fast test-paper bench-venv bench-venv-trl116

$(INSTALLED): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q pip==25.3
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $(INSTALLED)

repro: $(INSTALLED)
	dvc repro

# Two workers, one test file each at a time: the end-to-end file runs on one while the other does the rest.
test: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -m "not paper" -n 2 --dist loadfile

# The paper-scale dry runs on the CPU (tests/test_paper_dryrun.py, ~37 min and ~13 GiB; tests/test_paper_dryrun_families.py,
# ~23 min and ~18 GiB each): not part of `make test`.
test-paper: $(INSTALLED)
	$(PYTHON) -m pytest -m paper

test-fast: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(PYTHON) -m pytest -m "not slow and not paper"

# The benchmark extras (benchmarks/bench_trl.py): TRL in venvs of their own inside the repo (git-ignored), so that
# .venv stays exactly as requirements.txt pins it. TRL 1.13 (MiniLLMTrainer's last) and TRL 1.16.
define bench_venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q pip==25.3
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -r $(2)
	touch $(1)/.installed
endef

.venv-bench/.installed: requirements-bench.txt requirements.txt
	$(call bench_venv,.venv-bench,requirements-bench.txt)

.venv-bench-trl116/.installed: requirements-bench-trl116.txt requirements.txt
	$(call bench_venv,.venv-bench-trl116,requirements-bench-trl116.txt)

bench-venv: .venv-bench/.installed

bench-venv-trl116: .venv-bench-trl116/.installed
