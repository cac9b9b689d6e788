# The few commands a person types. Every target creates (or reuses) the virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: install test sync readme export clean-venv

# Create the venv and install the package with its dev extra; redone only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing otkd_nb and its dependencies into $(VENV) (the first time downloads torch: a few minutes)..."
	@$(PIP) install --upgrade pip 2> >(grep -v '^WARNING: Location' >&2)
	@$(PIP) install -e '.[dev]' 2> >(grep -v '^WARNING: Location' >&2)
	@touch $(STAMP)

install: $(STAMP)

# Export the notebooks to the package and regenerate README.md from nbs/index.ipynb.
export: $(STAMP)
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	$(BIN)/python tools/readme.py

# The test command: notebooks and package in sync, README up to date, every notebook runs, then pytest.
test: $(STAMP)
	$(BIN)/python tools/check_sync.py
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2  # two notebooks at a time, one thread each: no oversubscription
	$(BIN)/python -m pytest tests/ -q

clean-venv:
	rm -rf $(VENV)
