# Quick start: `make test` (the test suite) and `make demo` (end-to-end demo on synthetic data).
# Both create .venv from requirements.txt (the tested lock) on first use and install mdpl into it in
# editable mode (no dependencies of its own: the lock already has them).
# `make docs` builds the documentation site strictly into site/, in its own small venv (docs/requirements.txt).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo docs venv clean-venv

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

DOCS_VENV ?= .venv-docs

$(DOCS_VENV)/.installed: docs/requirements.txt
	test -x $(DOCS_VENV)/bin/python || python3 -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $@

# --strict: a broken link or anchor, a page missing from the nav or an API object that no longer exists fails
docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/python -m mkdocs build --strict --clean -f tools/mkdocs.yml

clean-venv:
	rm -rf $(VENV) $(DOCS_VENV)
