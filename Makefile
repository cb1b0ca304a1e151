# On a fresh clone: `make run` (the main job), `make test` (the fast suite, minutes) and
# `make test-all` (the fast suite, then the slow end-to-end tests: `make test-slow`).
# Each creates or reuses .venv and installs what it needs; the CPU torch wheel goes in first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metaloss-installed

.PHONY: setup run test test-slow test-all lint typecheck docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 \
	  || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/metaloss-meta experiment=quickstart

# Fast suite: every test not marked slow (< 10 min on 2 idle cores; README "Tests").
test: setup
	WANDB_SILENT=true $(PY) -m pytest -q -m "not slow"

# The slow end-to-end tests alone (subprocess runs, launchers, recorded reproductions).
test-slow: setup
	WANDB_SILENT=true $(PY) -m pytest -q -m slow --durations=15

test-all: test test-slow

# The documentation site (mkdocs.yml, docs/): strict, so a broken link, a missing page or a
# docstring mkdocstrings cannot read fails the build (.ci/run runs it).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d site

# Static checks, run by .ci/run beside the tests: ruff (rules in pyproject's [tool.ruff], and
# the formatting `ruff format` gives: run it before committing), import-linter (the package's layers: pyproject's [tool.importlinter]); `make typecheck`:
# mypy over every module of metaloss/, none ignored (settings in pyproject's [tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check metaloss tests scripts
	$(VENV)/bin/ruff format --check metaloss tests scripts
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

clean:
	rm -rf outputs multirun
