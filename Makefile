# The set-up commands of the README: `make demo`, `make test` and `make app`, each on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: app demo test lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,app]"
	$(PY) -m pip install --no-deps "torchattacks>=3.5"  # its requests~=2.25 pin is for downloads only
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m purifytf demo

app: install  # the web page on http://127.0.0.1:7860 (APP_ARGS="--port 8080" to change)
	$(PY) -m purifytf app $(APP_ARGS)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q
