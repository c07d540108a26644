# Each target installs what it needs into a local venv (.venv) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastspec-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastspec demo

lint: $(STAMP)
	$(VENV)/bin/ruff check fastspec kernels tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output
