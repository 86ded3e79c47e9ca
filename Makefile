# The two set-up commands of the README: `make demo` and `make test`, each on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps "torchattacks>=3.5"  # its requests~=2.25 pin is for downloads only
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m purifytf demo

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q
