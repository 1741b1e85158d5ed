# Two commands on a fresh machine:
#   make train   set up .venv, then run the reference recipe (RoBERTa-base on AG News from the hub)
#   make test    set up .venv, then run the test suite (offline, CPU)
# TORCH picks the PyTorch wheel: the default is the CPU build used here; on a GPU box use e.g. TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-train train test bench gpu-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed-hub: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,hub]" -c constraints.txt
	touch $@

setup-train: $(VENV)/.installed-hub

train: setup-train
	$(VENV)/bin/loracls train --config configs/agnews-roberta-base.yaml $(ARGS)

# Two pytest workers, one thread each (tests/conftest.py): on 2 cores that is about twice as fast as one worker.
test: setup
	$(PY) -m pytest -n 2 $(ARGS)

bench: setup
	$(PY) bench/run.py $(or $(ARGS),all)

# The GPU check (bench/gpu_check.py): on the GPU machine, which has torch, transformers and peft but no venv.
gpu-check:
	PYTHONPATH=src $(PYTHON) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
