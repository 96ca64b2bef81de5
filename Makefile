# The two entry points of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
DEMO ?= demo
BIN = $(VENV)/bin

.PHONY: demo test install clean-demo

$(BIN)/trimdb: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/trimdb

install: $(BIN)/trimdb

# Real pool from four pinned PyPI packages, the embedded SmolLM2 model, two real target tasks.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" DEMO="$(DEMO)" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)
