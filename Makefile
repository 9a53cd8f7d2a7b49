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
	# DeepSpeed (optional extra, tests/test_deepspeed.py): a pure-Python install against the torch above,
	# no ops built (its CPU ops JIT-compile only when used; the tests use none).
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,deepspeed]'
	# pip -q hides setup.py's report of what it built; say it here (see memo.backend_info()).
	$(PY) -c "import memo, json; print('memo._C:', json.dumps(memo.backend_info()['csrc']))"
	touch $(STAMP)

# The main job: a small Llama learns to retrieve a value planted far back in 1024-token sequences,
# on 2 CPU processes (sequence parallel 2, swapping), then memo plans a 7B model at 1M tokens.
demo: setup
	$(PY) examples/train_long_context.py --out runs/train_long_context
	$(VENV)/bin/memo plan --model memo-paper-7b --seq-len 1M --gpus 8 --sp 8 --gpu a800 --host-memory 2TiB \
		--out runs/plan-7b-1m.json --plot runs/plan-7b-1m.png
	@echo "demo: training summary runs/train_long_context/summary.json, plot runs/train_long_context/training.png;" \
		"plan runs/plan-7b-1m.json, plot runs/plan-7b-1m.png"

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info memo/*.so
