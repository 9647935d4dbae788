# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv when it is missing and installs fastdetr into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastdetr-installed

.PHONY: venv demo test test-slow test-transformers4 lint clean report-triton-latest

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU wheel, so nothing below can pull a CUDA build. --no-compile: Python
	# compiles what is imported when it is first imported; byte-compiling all of torch up front took 3x as long.
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(PY) -m fastdetr demo

lint: venv
	$(PY) -m ruff check .

# The Triton kernels run on the CPU through Triton's interpreter, one pytest-xdist worker per core; an idle
# worker takes tests queued for the other (worksteal: 167 s here against 188 s with whole modules per worker,
# though a module's shared fixture may then be built on both workers).
# The tests marked slow (each over ~20 s, covered in kind by the main set) run in test-slow; CI runs both.
PYTEST_WORKERS ?= auto
test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

test-slow: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m slow

# The transformers conversion and checkpoint tests again under transformers 4.57.6 (its DETR layer layout:
# DetrAttention with out_proj, fc1 / fc2 on the layer), installed with --no-deps into $(T4_DIR), not the venv
# (pins and why: constraints-transformers4.txt). CI runs it after test-slow.
T4_DIR ?= .transformers4
T4_STAMP := $(T4_DIR)/.fastdetr-installed
T4_TESTS := tests/test_hf_detr_optimize.py tests/test_hub_checkpoints.py

$(T4_STAMP): constraints-transformers4.txt
	rm -rf $(T4_DIR)
	$(PY) -m pip install -q --disable-pip-version-check --no-compile --no-deps --target $(T4_DIR) \
		-r constraints-transformers4.txt
	touch $@

test-transformers4: venv $(T4_STAMP)
	PYTHONPATH=$(T4_DIR) $(PY) -c "import transformers as t; assert t.__version__ == '4.57.6', t.__version__"
	PYTHONPATH=$(T4_DIR) TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(T4_TESTS)

# The kernel report under the newest Triton (what a newer torch brings its users), in its own venv:
# torch from constraints.txt (the CPU wheel) first, then triton==$(TRITON_LATEST) and fastdetr's runtime
# dependencies (numpy 2.4 is fine with it). Fails on a compile error or a spill, like the report in make test.
# Not part of make test: measured here, creating the venv took 2 min 15 s and the report 4 min 5 s on one
# core (REPORT_ARGS="--jobs 1", empty Triton cache; by default the report uses every core).
TRITON_LATEST ?= 3.9.0
LATEST_VENV ?= .venv-triton-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.fastdetr-triton-$(TRITON_LATEST)
REPORT_ARGS ?=

$(LATEST_STAMP): setup.py constraints.txt
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' constraints.txt)"
	$(LATEST_PY) -m pip install -q --disable-pip-version-check -e . "$$(grep '^torch==' constraints.txt)" \
		triton==$(TRITON_LATEST)
	touch $@

report-triton-latest: $(LATEST_STAMP)
	$(LATEST_PY) -m fastdetr.kernels.report $(REPORT_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(T4_DIR) build *.egg-info
