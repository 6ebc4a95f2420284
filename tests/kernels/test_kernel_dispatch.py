"""Backend choice: REALM_HPC_KERNELS read at every call, Triton imported lazily, one log line when it is missing."""

import importlib
import logging

import pytest
import torch

import kernels
from kernels import dispatch, reference


@pytest.fixture
def calls(monkeypatch, triton_cpu):
    """Record which implementation ran, without changing results."""
    seen = []

    def spy(mod, fn_name):
        real = getattr(mod, fn_name)
        monkeypatch.setattr(mod, fn_name, lambda *a, **kw: seen.append(fn_name) or real(*a, **kw))

    spy(importlib.import_module("kernels.ip_topk"), "ip_topk_triton")
    spy(importlib.import_module("kernels.marginal_lse"), "marginal_logsumexp_triton")
    spy(reference, "ip_topk_reference")
    spy(reference, "marginal_logsumexp_reference")
    return seen


def _run_both():
    q, x = torch.randn(2, 8), torch.randn(20, 8)
    kernels.ip_topk(q, x, 3)
    kernels.marginal_logsumexp(torch.randn(2, 5), -torch.rand(2, 5))


def test_auto_uses_reference_on_cpu(monkeypatch, calls):
    monkeypatch.delenv("REALM_HPC_KERNELS", raising=False)
    _run_both()
    assert calls == ["ip_topk_reference", "marginal_logsumexp_reference"]


def test_env_is_read_at_call_time(monkeypatch, calls):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    _run_both()
    monkeypatch.setenv("REALM_HPC_KERNELS", "torch")
    _run_both()
    assert calls == ["ip_topk_triton", "marginal_logsumexp_triton",
                     "ip_topk_reference", "marginal_logsumexp_reference"]


def test_k_above_64_runs_the_reference(monkeypatch, calls):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    kernels.ip_topk(torch.randn(1, 4), torch.randn(100, 4), 65)
    assert calls == ["ip_topk_reference"]


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("REALM_HPC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="REALM_HPC_KERNELS"):
        _run_both()


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _run_both()


def test_missing_triton_falls_back_with_one_log_line(monkeypatch, caplog, calls):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_triton_modules", {})
    monkeypatch.setattr(dispatch, "_triton_missing", False)

    def no_triton(name):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(dispatch.importlib, "import_module", no_triton)
    with caplog.at_level(logging.INFO, logger="kernels"):
        _run_both()
        _run_both()
    assert calls == ["ip_topk_reference", "marginal_logsumexp_reference"] * 2
    lines = [r for r in caplog.records if r.name == "kernels"]
    assert len(lines) == 1 and "triton unavailable" in lines[0].getMessage()


def test_package_attribute_stays_the_function():
    """Importing kernels/ip_topk.py must not rebind the public kernels.ip_topk to the module."""
    importlib.import_module("kernels.ip_topk")
    assert kernels.ip_topk is dispatch.ip_topk


def test_kernels_imports_nothing_from_realm_hpc():
    import ast
    import pathlib

    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "realm_hpc" for n in names), path


def test_d_above_256_runs_the_reference(monkeypatch, calls):
    monkeypatch.setenv("REALM_HPC_KERNELS", "triton")
    kernels.ip_topk(torch.randn(1, 300), torch.randn(50, 300), 5)
    assert calls == ["ip_topk_reference"]
