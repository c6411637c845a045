# `make run` and `make test` create .venv on first use and install the project into it.
# A new top-level package (its __init__.py) triggers a reinstall, so editable imports find it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast venv fixture bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(wildcard */__init__.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[engine,test]'
	touch $(STAMP)

run: venv
	$(BIN)/erq serve

test: venv
	$(BIN)/python -m pytest

# The unit lane: pure computation and the API in process on SQLite, in under two minutes.
test-fast: venv
	$(BIN)/python -m pytest -m unit -q

fixture: venv
	$(BIN)/python tests/fixtures/make_fixture.py

bench: venv
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/accuracy.py

clean:
	rm -rf $(VENV) var
