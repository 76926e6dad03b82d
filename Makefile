# Both targets set themselves up on a fresh machine: a venv with the CPU torch wheel first (a ranged
# torch requirement with no torch installed would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradtrack-installed

.PHONY: demo test lint bench
demo: $(STAMP)
	$(PY) examples/rnn_explosion_demo.py

test: $(STAMP)
	bash scripts/system-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) scripts/check_dist.py
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

$(STAMP): pyproject.toml testing/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[mlflow,wandb,dev,lightning,transformers]"
	$(PY) -m pip install -q -e ./testing  # gradtrack_testing: helpers of the tests and benchmarks, not in the wheel
	touch $(STAMP)
