# Two commands do all the set-up on a fresh machine (see README):
#   make figures   regenerate the paper figures from the bundled data
#   make test      run every check CI runs
# Both create (or reuse) the virtual environment in .venv and install what they need.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deepseq-installed
export MPLBACKEND := Agg
export OMP_NUM_THREADS := 2
export OPENBLAS_NUM_THREADS := 2
export NUMBA_NUM_THREADS := 2
export PYTHONHASHSEED := 0

.PHONY: figures test test-fast test-slow check-sync nbtest pytest bench install clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes; the package itself is installed editable.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

figures: install
	$(BIN)/deepseq figures $(if $(ONLY),--only $(ONLY),)

# The CI suite: notebooks and package in sync, notebook tests, pytest (slow checks excluded).
test: install check-sync nbtest pytest

# Export and clean must leave the tree as it was (the package is generated from the notebooks).
check-sync: install
	@before=$$(git status --porcelain | md5sum; git diff | md5sum); \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean; \
	after=$$(git status --porcelain | md5sum; git diff | md5sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-export/nbdev-clean changed files: commit the exported package and clean notebooks"; git status --short; exit 1; fi
	@echo "notebooks and package in sync"

nbtest: install
	$(BIN)/nbdev-test --n-workers 2 --timing

pytest: install
	$(BIN)/python -m pytest -q

# Slow checks (flagged `slow` in notebooks, marked `slow` in pytest).
test-slow: install
	$(BIN)/nbdev-test --n-workers 2 --flags slow
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf paper_figures/out paper_figures/runs .deepseq_cache
