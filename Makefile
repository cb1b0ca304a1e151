# Two commands on a fresh clone: `make run` (the main job) and `make test` (the whole suite).
# Each creates or reuses .venv and installs what it needs; the CPU torch wheel goes in first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metaloss-installed

.PHONY: setup run test lint typecheck clean

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

test: setup
	WANDB_SILENT=true $(PY) -m pytest -q

# Static checks, run by .ci/run beside the tests: ruff (rules in pyproject's [tool.ruff]) and
# mypy over metaloss/ (scope and the modules not yet clean in pyproject's [tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check metaloss tests scripts

typecheck: setup
	$(VENV)/bin/mypy

clean:
	rm -rf outputs multirun
