# Two commands: `make test` and `make demo`. Each creates .venv/ on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Tests and demos never reach the W&B servers.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONHASHSEED ?= 0

.PHONY: test demo lint mutate clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	WANDB_DIR=$$(mktemp -d) $(BIN)/python -m pytest tests notebooks --nbval-lax

demo: $(STAMP)
	$(BIN)/python -m utils.demo

# Plants known bugs one at a time and reports which the tests catch (slow: not part of `make test`).
mutate: $(STAMP)
	$(BIN)/python benchmarks/mutate.py

lint: $(STAMP)
	$(BIN)/ruff check utils tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
