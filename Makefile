# `make run` and `make test` create .venv on first use and install the project into it.
# editable_mode=compat puts the checkout itself on sys.path, so packages added later import too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv fixture bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: venv
	$(BIN)/erq serve

test: venv
	$(BIN)/python -m pytest

fixture: venv
	$(BIN)/python tests/fixtures/make_fixture.py

bench: venv
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/accuracy.py

clean:
	rm -rf $(VENV) var
