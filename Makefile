# Each target installs what it needs into a local venv (.venv) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastspec-installed

.PHONY: demo test lint wheel-check clean

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,spender]' torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastspec demo

lint: $(STAMP)
	$(VENV)/bin/ruff check fastspec kernels tests bench

# The test suite, then the package as users install it (.ci/wheel-check: wheel → fresh venv → smoke run).
test: $(STAMP) lint
	$(PY) -m pytest -q
	.ci/wheel-check $(PY)

wheel-check: $(STAMP)
	.ci/wheel-check $(PY)

clean:
	rm -rf $(VENV) demo-output
