# The few commands a person types. Every target creates (or reuses) the virtual environment in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: install test bench export fashion-mnist clean-venv

# Create the venv and install the package with its dev extra; redone only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing otkd_nb and its dependencies into $(VENV) (the first time downloads torch: a few minutes)..."
	@$(PIP) install --upgrade pip 2> >(grep -v '^WARNING: Location' >&2)
	@$(PIP) install -e '.[dev]' 2> >(grep -v '^WARNING: Location' >&2)
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, the real data a CPU can train on, from Debian's dataset-fashion-mnist (skipped if present or not root).
FMNIST := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FMNIST) || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist into $(FMNIST)..."; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || echo "warning: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	else echo "note: $(FMNIST) is missing; install Debian's dataset-fashion-mnist (or set OTKD_DATA) to run the Fashion-MNIST parts"; fi; }

# Clean the notebooks and their saved outputs, export them to the package and regenerate README.md from nbs/index.ipynb.
export: $(STAMP)
	$(BIN)/nbdev-clean
	$(BIN)/python tools/clean_outputs.py
	$(BIN)/nbdev-export
	$(BIN)/python tools/readme.py

# The test command: notebooks and package in sync, README up to date, every notebook runs, then pytest.
test: $(STAMP) fashion-mnist
	$(BIN)/python tools/check_sync.py
	@# two notebooks at a time, one thread each (no oversubscription); without a GPU, Triton kernels run in Triton's interpreter
	OMP_NUM_THREADS=1 TRITON_INTERPRET=$$($(BIN)/python -c 'import torch; print(int(not torch.cuda.is_available()))') $(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest tests/ -q

# Mutation testing of the core modules: plant each named bug of tools/mutate.py in a copy of the package, run the fast tests
# that cover it, and report the share caught (fails under 95%). About 20 minutes on two cores; MUTATE_ARGS="--help" lists the options.
.PHONY: mutate
mutate: $(STAMP)
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

clean-venv:
	rm -rf $(VENV)

# Solver and training-step benchmarks (CUDA when available); results in bench_results/.
bench: $(STAMP)
	$(BIN)/otkd-bench

# The README's first command: set everything up, then distil on Fashion-MNIST on the CPU in a few minutes
# (a teacher, then the student alone, with KD and with IPOT+KD; runs, table and figure in runs/demo; DEMO_ARGS="--help" lists the options).
.PHONY: demo
demo: $(STAMP) fashion-mnist
	$(BIN)/otkd-demo $(DEMO_ARGS)

# The documentation site, offline: nbdev processes nbs/ (as nbdev-docs does), Sphinx + MyST-NB renders it into _docs/.
.PHONY: docs docs-check
docs: $(STAMP)
	$(BIN)/python tools/build_docs.py

# Check the built site in headless Chromium (installs Debian's chromium and chromium-driver when root); screenshots in _docs_artifacts/.
docs-check: docs
	OTKD_DOCS_SITE=_docs $(BIN)/python -m pytest tests/test_docs.py -q -s

# The comparison on a CPU (Fashion-MNIST; otkd_nb.study), in two stages that run in the background, each call at most 150 minutes:
#   make results-tune   the shared teacher, the schedule check, the OT weight calibration, and the tuning of every method on a holdout split
#   make results        the final rows (every method, five seeds, on the test set), once the tuning is finished
# Call a target again until its log says "Finished": finished runs are reused from results/fashion_mnist/runs/, an interrupted one continues.
# Output in results/fashion_mnist.log; RESULTS_ARGS="--help" lists the options.
RESULTS_LOG := results/fashion_mnist.log
RESULTS_MINUTES ?= 150
.PHONY: results results-tune
results-tune: STAGE := tune
results: STAGE := final
results results-tune: $(STAMP) fashion-mnist
	@mkdir -p results
	@if [ -f runs/study/results.pid ] && kill -0 $$(cat runs/study/results.pid) 2>/dev/null; then \
	  echo "otkd-results is already running (pid $$(cat runs/study/results.pid)); follow it with: tail -f $(RESULTS_LOG)"; exit 1; fi
	@case "$(RESULTS_ARGS)" in *-h*) $(BIN)/otkd-results $(RESULTS_ARGS); exit 0;; esac; \
	nohup $(BIN)/otkd-results --stage $(STAGE) --max-minutes $(RESULTS_MINUTES) --quiet $(RESULTS_ARGS) >> $(RESULTS_LOG) 2>&1 & \
	echo "otkd-results --stage $(STAGE) started in the background (pid $$!); follow it with: tail -f $(RESULTS_LOG)"
