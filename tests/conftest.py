import os
import sys

# Triton's interpreter must be switched on before any @triton.jit function is defined, i.e. before kernels/ is
# imported anywhere in the test session. Kernel tests force REALM_HPC_KERNELS=triton where they need it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: on 2 cores, torch's default of 2 threads collapses (10-40x slower steps) as soon as any other
# process holds a core, and the MPI tests run a trainer and a refresher side by side. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-builds its CPU comm op into ~/.cache/torch_extensions; venvs sharing that cache (other checkouts)
# rebuild it over each other (minutes under load). One cache per venv, built once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(sys.executable)),
                                                           "torch_extensions"))
