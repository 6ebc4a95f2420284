"""Backend choice for the public kernels: REALM_HPC_KERNELS = auto | triton | torch, read at every call.

auto: Triton for CUDA tensors, the torch reference otherwise (training on CPU runs the reference).
triton: Triton everywhere; CPU tensors need TRITON_INTERPRET=1 set before kernels/ is first imported.
torch: the reference everywhere.
Triton is imported lazily, only when a call first needs it, so CPU-only processes never pay for it; if it
cannot be imported, calls fall back to the reference and the "kernels" logger says so once.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from kernels import reference

ENV = "REALM_HPC_KERNELS"
MODES = ("auto", "triton", "torch")
log = logging.getLogger("kernels")

_triton_modules: dict[str, object] = {}
_triton_missing = False


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {MODES}")
    return value


def _load(name: str):
    """kernels.<name> if Triton imports, else None (logged once for the process)."""
    global _triton_missing
    if _triton_missing:
        return None
    if name not in _triton_modules:
        try:
            _triton_modules[name] = importlib.import_module(f"kernels.{name}")
        except ImportError as exc:
            _triton_missing = True
            log.warning("triton unavailable (%s): kernels fall back to the torch reference", exc)
            return None
    return _triton_modules[name]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_module(name: str, device: torch.device):
    """The Triton module to run on ``device``, or None for the reference."""
    m = mode()
    if m == "torch" or (m == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{ENV}=triton on {device} tensors needs TRITON_INTERPRET=1 (set before importing kernels)")
    return _load(name)


def ip_topk(q: torch.Tensor, index: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """Exact top-k inner products: (scores float32 [B, k] descending, ids int64 [B, k]).

    Scores accumulate in float32 (any input dtype), so the ids are a float32 brute force's up to summation order
    (only near-exact ties can differ between backends). Ties go to the lower id; ``exclude`` (int64 [B], -1 = none) names one id per query never returned, fused
    into the search so k results always come back. No autograd: scores are detached (re-score the chosen
    documents to get gradients). k > N is a ValueError; k > 64 or D > 256 always runs the (chunked) reference.
    On a GPU, float32 inputs are multiplied in tf32x3 (three tf32 tensor-core products, ~1e-6 relative to
    |q| |x|), 16-bit inputs exactly.
    """
    mod = triton_module("ip_topk", q.device)
    if mod is None or k > reference.MAX_K or q.dim() != 2 or q.shape[-1] > reference.MAX_D:
        return reference.ip_topk_reference(q, index, k, exclude)
    return mod.ip_topk_triton(q, index, k, exclude)


def marginal_logsumexp(retrieval_scores: torch.Tensor, reader_logprob: torch.Tensor) -> torch.Tensor:
    """log sum_z softmax(r)_z * exp(l_z) over the last dim, differentiable in both inputs.

    float32 result for float32/bf16/fp16 inputs (float64 stays float64). -inf entries mean an absent doc (r)
    or zero reader probability (l); a row whose result is -inf gets zero gradients, not NaN.
    """
    mod = triton_module("marginal_lse", retrieval_scores.device)
    if mod is None:
        return reference.marginal_logsumexp_reference(retrieval_scores, reader_logprob)
    return mod.marginal_logsumexp_triton(retrieval_scores, reader_logprob)


def target_logprob(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   target_mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """sum_t mask * log_softmax(hidden @ weight.T + bias)[targets] per row of hidden [n, T, H]: [n] float32.

    Computed over the vocabulary in chunks (online log-sum-exp forward, recomputing backward), so [n, T, V] logits
    never exist; differentiable in hidden, weight and bias. Every mode runs the chunked torch implementation
    (kernels/target_logprob.py has no Triton kernel: its work is GEMMs); the mode is still validated.
    """
    mode()
    from kernels.target_logprob import target_logprob_chunked  # no Triton import: safe in every process

    return target_logprob_chunked(hidden, weight, bias, targets, target_mask, chunk_size)
