# Two commands: `make test` and `make demo`. Each creates .venv/ on first use.
# Local use: `make lab` opens the notebooks in JupyterLab; `make train ARGS="..."` and
# `make bench ARGS="..."` run the command line with the venv's Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Tests and demos never reach the W&B servers.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONHASHSEED ?= 0

.PHONY: test demo lint mutate clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements-dev.txt
	# the project itself, editable: notebooks and benchmarks import utils without touching sys.path
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Two workers (pytest-xdist), one torch thread each; a file's tests stay together on one worker and
# torchrun/browser tests run one at a time (tests/conftest.py: SHARED_SCOPES). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	# PYTHONDONTWRITEBYTECODE= : pytest keeps its assertion rewrites and Python its bytecode (both
	# git-ignored), so a second run collects in 7 s instead of 10 and every subprocess starts faster
	PYTHONDONTWRITEBYTECODE= WANDB_DIR=$$(mktemp -d) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests notebooks --nbval-lax

demo: $(STAMP)
	$(BIN)/python -m utils.notebook.demo

# Plants known bugs and reports which the tests catch, two mutants at a time (minutes: not part of `make test`).
mutate: $(STAMP)
	$(BIN)/python benchmarks/mutate.py --jobs 2

lint: $(STAMP)
	$(BIN)/ruff check utils tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

.PHONY: lab train bench nbstripout-filter

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

train: $(STAMP)
	$(BIN)/python -m utils.training train $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m utils.training bench $(ARGS)

# Notebook outputs never reach git: .gitattributes sends *.ipynb through the nbstripout filter, which
# this configures (relative path: git runs filters from the top of the work tree). --keep-id keeps
# the committed cell ids, so a clean notebook passes through unchanged. Outside a git checkout
# (an unpacked archive) there is nothing to configure.
nbstripout-filter: $(STAMP)
	@if [ -e .git ]; then \
		git config filter.nbstripout.clean '$(BIN)/python -m nbstripout --keep-id' && \
		git config filter.nbstripout.smudge cat && \
		git config filter.nbstripout.required true && \
		git config diff.ipynb.textconv '$(BIN)/python -m nbstripout --keep-id -t'; \
	else \
		echo "Not a git checkout: the nbstripout filter is not configured."; \
	fi

test demo lab train bench: nbstripout-filter
