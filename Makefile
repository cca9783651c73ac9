# The two commands the README opens with; each sets itself up on a fresh machine.
#   make demo   set up .venv, then on CPU: preprocess the bundled corpora, then examples/tiny.yaml:
#               continual pretraining, then instruction tuning from its weights
#   make test   set up .venv (and, as root on Debian, the Slurm / Open MPI packages the launch tests use), then
#               run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: exactly this wheel (served locally); another version or a range pulls GBs of CUDA packages
TORCH_SPEC ?= torch==2.13.0
# the exact version of every package the tests import; setup.py only holds compatible ranges
LOCK := constraints.txt
EXTRAS := test,dali,wandb,slurm,mpi

.PHONY: setup demo test benchmarks system-deps lock

# Everything from the lock, the build tools too (the package is built without an isolated build environment,
# which would take the newest setuptools of the day); the file used is recorded for tests/test_install.py.
$(VENV)/.installed: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) setuptools wheel "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(LOCK) --no-build-isolation -e ".[$(EXTRAS)]"
	echo "$(abspath $(LOCK))" > $(VENV)/medmoe-constraints
	touch $@

setup: $(VENV)/.installed

MEDMOE := $(VENV)/bin/medmoe

demo: setup
	$(MEDMOE) preprocess --input 'examples/data/text/*.jsonl' --tokenizer examples/tokenizer --format text --output-prefix runs/data/tiny_text
	$(MEDMOE) preprocess --input 'examples/data/chat/*.jsonl' --tokenizer examples/tokenizer --format chat --output-prefix runs/data/tiny_chat
	$(MEDMOE) train examples/tiny.yaml

# Debian's Slurm, munge and Open MPI for tests/test_slurm.py (which starts its own two-node cluster); without
# root or apt those tests skip, saying so
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash tests/slurm/install.sh; \
	else echo "not root or no apt-get: the Slurm and MPI tests will skip"; fi

test: setup system-deps
	$(PY) -m pytest -q --durations=25 tests

benchmarks: setup
	$(PY) benchmarks/step_time.py

# Re-resolve setup.py's ranges in a scratch environment and write the result as the new lock.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet "$(TORCH_SPEC)" setuptools wheel
	$(VENV)-lock/bin/pip install --quiet -e ".[$(EXTRAS)]"
	{ grep '^#' $(LOCK); $(VENV)-lock/bin/pip freeze --all --exclude-editable \
	  | grep -v -i -E '^(pip|megatron-medmoe)==' | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(VENV)-lock
