# The two commands the README opens with; each sets itself up on a fresh machine.
#   make demo   set up .venv, then on CPU: preprocess the bundled corpora, then examples/tiny.yaml:
#               continual pretraining, then instruction tuning from its weights
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
	$(PY) -m pip install --quiet -e ".[test,dali,wandb]"
	touch $@

setup: $(VENV)/.installed

MEDMOE := $(VENV)/bin/medmoe

demo: setup
	$(MEDMOE) preprocess --input 'examples/data/text/*.jsonl' --tokenizer examples/tokenizer --format text --output-prefix runs/data/tiny_text
	$(MEDMOE) preprocess --input 'examples/data/chat/*.jsonl' --tokenizer examples/tokenizer --format chat --output-prefix runs/data/tiny_chat
	$(MEDMOE) train examples/tiny.yaml

test: setup
	$(PY) -m pytest -q tests

benchmarks: setup
	$(PY) benchmarks/step_time.py
