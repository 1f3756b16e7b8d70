# Quick start: `make test` (the test suite) and `make demo` (end-to-end demo on synthetic data).
# Both create .venv from requirements.txt (the tested lock) on first use and install mdpl into it in
# editable mode (no dependencies of its own: the lock already has them).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) run.py with demo

clean-venv:
	rm -rf $(VENV)
