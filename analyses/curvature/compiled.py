"""Forward-over-reverse HVPs of one fixed batch compiled by ``torch.compile`` (opt-in: ``method="compiled"``).

Why. On small models an HVP is dominated by per-operator overhead of the autograd engine, not by
arithmetic: the 1-layer GPT-2 of the benchmark (1.1k parameters) spends 1.7 ms per cached-graph HVP
in ~300 tiny kernels. Compiling ``jvp(grad(L))`` into one fused graph takes that to 0.88 ms (float32,
1 thread, measured) — but the compilation itself costs tens of seconds (35 s for that model on this
2-core machine), so ``auto`` never picks it: it pays off only when one operator serves many products
(several Lanczos runs, density and trace, many seeds). The function is exact (the same jvp-of-grad as
``forward_over_reverse``); tests compare it with dense float64 Hessians.

The parameters and the vector are inputs of the compiled function, so products at new parameter values
of the same shapes reuse it; the batch and the model structure are constants of it. ``torch.compile``
recompiles (or falls back to eager, with a warning) when its guards fail; nothing here hides that.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor


class CompiledHVP:
    def __init__(self, L: Callable, dynamic: bool = False):
        grad_L = torch.func.grad(L)

        def hvp(params: dict, v: dict) -> dict:
            return torch.func.jvp(grad_L, (params,), (v,))[1]

        self._fn = torch.compile(hvp, dynamic=dynamic)

    def __call__(self, params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> dict:
        params = dict(params)
        return self._fn(params, {n: v[n] for n in params})
