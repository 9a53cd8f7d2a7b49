# Two targets users run: `make demo` and `make test`. Each sets up .venv first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memo-installed
# Reinstall when the build inputs change (setup.py, C++/CUDA sources).
BUILD_INPUTS := setup.py Makefile $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The CPU build of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q numpy ninja pytest matplotlib
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	# pip -q hides setup.py's report of what it built; say it here (see memo.backend_info()).
	$(PY) -c "import memo, json; print('memo._C:', json.dumps(memo.backend_info()['csrc']))"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info memo/*.so
