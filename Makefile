# Quick start: `make test` (the test suite) and `make demo` (end-to-end demo on synthetic data).
# Both create .venv from requirements.txt on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) run.py with demo

clean-venv:
	rm -rf $(VENV)
