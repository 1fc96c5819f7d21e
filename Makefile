# Fresh machine: `make train` sets up .venv and trains the tiny default; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup train test lint wheel gpu-wheels clean

setup: $(STAMP)

# torch first and pinned: it is the CPU wheel here, and an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev,tensorboard,wandb,rouge,aws]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m fsdp_kit.train $(ARGS)

# Tests in parallel (pytest-xdist): many wait on subprocesses, sleeps and Slurm rather than on a core, so 3 workers
# fill a 2-core machine; PYTEST_WORKERS=0 runs them in this process, one after the other. loadfile: each file on
# one worker, so a module's fixtures are built once and the Slurm tests share one cluster (tests/conftest.py).
PYTEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

wheel: $(STAMP)
	$(PIP) wheel --no-deps --no-build-isolation -w dist .

# .whl/: hydra-core, omegaconf, antlr4, submitit, hydra-submitit-launcher for the offline GPU machine (Python 3.12);
# benchmarks/gpu/run.sh installs them there.
gpu-wheels: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu/build_wheels.sh .whl

# ruff's lint rules, its formatter's check (settings in pyproject.toml; `ruff format fsdp_kit` applies it) and mypy
# on the package (its [tool.mypy] settings): what .ci/run runs after the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check fsdp_kit tests benchmarks examples
	$(VENV)/bin/ruff format --check fsdp_kit
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache build dist
