# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv when it is missing and installs fastdetr into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdetr-installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU wheel, so nothing below can pull a CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(PY) -m fastdetr demo

lint: venv
	$(PY) -m ruff check .

# The Triton kernels run on the CPU through Triton's interpreter.
test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
