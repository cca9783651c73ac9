# The two commands the README opens with; each sets itself up on a fresh machine.
#   make demo   set up .venv, then train the tiny Post-MoE model on CPU (examples/tiny_cpu.yaml)
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: exactly this wheel (served locally); another version or a range pulls GBs of CUDA packages
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test benchmarks

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/medmoe train examples/tiny_cpu.yaml

test: setup
	$(PY) -m pytest -q tests

benchmarks: setup
	$(PY) benchmarks/step_time.py
