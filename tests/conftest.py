import os

# Triton's interpreter must be switched on before any @triton.jit function is defined, i.e. before kernels/ is
# imported anywhere in the test session. Kernel tests force REALM_HPC_KERNELS=triton where they need it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
