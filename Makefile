# Both targets set themselves up on a fresh machine: a venv with the CPU torch wheel first (a ranged
# torch requirement with no torch installed would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
# pytest-xdist workers: each module's tests in one worker (its module fixtures once), an MLflow server each; three on
# two cores, because many tests wait on servers and subprocesses (docs/development.md has the timings)
WORKERS ?= 3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradtrack-installed

# Material for MkDocs prints a notice about its end of life on every build; it is no warning of ours.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: demo test lint bench docs
demo: $(STAMP)
	$(PY) examples/rnn_explosion_demo.py

# The site, into site/; --strict: a broken link, a missing anchor or an API reference that does not resolve fails.
docs: $(STAMP)
	$(MKDOCS) build --strict

# pytest writes bytecode even where the environment says not to: the suite starts some 300 Python processes, and
# each would compile gradtrack's modules and the tests' helpers again
test: $(STAMP)
	bash scripts/system-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(MKDOCS) build --strict --quiet
	$(PY) scripts/check_dist.py
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -ra -n $(WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

$(STAMP): pyproject.toml testing/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[mlflow,wandb,dev,lightning,transformers,deepspeed]"
	$(PY) -m pip install -q -e ./testing  # gradtrack_testing: helpers of the tests and benchmarks, not in the wheel
	# DeepSpeed JIT-builds its CPU communication op the first time an engine starts (1-2 min): once here, not in a test
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null
	touch $(STAMP)
