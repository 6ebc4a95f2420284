"""Kernels for realm-hpc: exact inner-product top-k, the marginal log-sum-exp loss, the chunked MLM head loss.

The functions below are the only entry points; ip_topk and marginal_logsumexp pick Triton or the torch reference
at call time (see kernels.dispatch, env REALM_HPC_KERNELS). This package imports nothing from realm_hpc.
Layout (Liger-Kernel style, one kernel per file): ip_topk.py and marginal_lse.py hold @triton.jit kernels,
launchers and autograd glue; target_logprob.py the reader's MLM loss chunked over the vocabulary (torch GEMMs, no
Triton); reference.py the torch definitions; aot.py the compile-for-GPU check.
"""

import sys
import types

from kernels.dispatch import ip_topk, marginal_logsumexp, target_logprob

__all__ = ["ip_topk", "marginal_logsumexp", "target_logprob"]


class _Package(types.ModuleType):
    """Keeps ``kernels.ip_topk`` the public function once the submodule kernels/ip_topk.py is imported.

    Importing a submodule rebinds the parent's attribute of the same name to the module; without this guard
    the first Triton call would silently turn ``kernels.ip_topk`` into a module. Reach kernel modules with
    importlib.import_module("kernels.ip_topk").
    """

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
