"""Fixtures that say which Triton mode a kernel test needs.

CPU kernel tests run Triton's interpreter (tests/conftest.py turns it on). GPU tests need the real compiler, so
they run in a separate invocation: ``TRITON_INTERPRET=0 pytest -m gpu tests/kernels``.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def triton_cpu():
    """Triton kernels on CPU tensors: needs triton and the interpreter."""
    pytest.importorskip("triton")
    if not INTERPRET:
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")


@pytest.fixture
def triton_gpu():
    """Compiled Triton on a CUDA device: needs a GPU and the interpreter off."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if INTERPRET:
        pytest.skip("GPU kernel tests need TRITON_INTERPRET=0 (pytest -m gpu tests/kernels)")
