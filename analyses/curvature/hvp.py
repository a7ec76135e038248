"""Per-batch exact Hessian-vector products, two ways, single vector and batched over columns.

Both methods compute the same exact quantity; they differ in cost per model (measure, don't assume:
see shared/env-notes.md section 5), so the operator picks one at run time.

* ``double_backward`` (reverse over reverse): grad with ``create_graph``, then grad of ``<g, v>``.
  Batched over k columns, the forward and the first backward are shared and only the second backward
  is repeated (``retain_graph``).
* ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad``. Batched over columns with
  ``torch.func.vmap``, which shares the primal computation.

Every function takes ``L(params_dict) -> scalar`` and parameter dicts, and returns a dict in the
same order. Parameters the loss never uses get exact zeros.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from eqlab.analyses.curvature.functional import ParamDict, _fill, _leaves, value_grad_hvp


def hvp_double_backward(L: Callable, params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> ParamDict:
    return value_grad_hvp(L, params, v)[2]


def hvp_forward_over_reverse(L: Callable, params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> ParamDict:
    params, v = dict(params), {n: v[n] for n in params}
    return torch.func.jvp(torch.func.grad(L), (params,), (v,))[1]


def hvps_double_backward(L: Callable, params: Mapping[str, Tensor], V: Mapping[str, Tensor]) -> ParamDict:
    """H·V for ``V = {name: (k, *shape)}``: one forward and first backward, k second backwards."""
    ps = _leaves(params)
    value = L(ps)
    grads = _fill(torch.autograd.grad(value, list(ps.values()), create_graph=True, allow_unused=True), ps)
    live = [n for n in ps if grads[n].requires_grad]  # the rest have zero Hessian rows
    k = next(iter(V.values())).shape[0]
    out = {n: torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for n, p in ps.items()}
    if not live:
        return out
    for j in range(k):
        cols = torch.autograd.grad([grads[n] for n in live], list(ps.values()),
                                   grad_outputs=[V[n][j] for n in live],
                                   retain_graph=j < k - 1, allow_unused=True)
        for n, c in zip(ps, cols):
            if c is not None:
                out[n][j] = c
    return out


def hvps_forward_over_reverse(L: Callable, params: Mapping[str, Tensor], V: Mapping[str, Tensor]) -> ParamDict:
    """H·V for ``V = {name: (k, *shape)}`` with ``vmap`` over the columns of a jvp-of-grad."""
    params = dict(params)
    V = {n: V[n] for n in params}
    grad_L = torch.func.grad(L)
    return torch.func.vmap(lambda v: torch.func.jvp(grad_L, (params,), (v,))[1])(V)


HVP = {"double_backward": hvp_double_backward, "forward_over_reverse": hvp_forward_over_reverse}
HVPS = {"double_backward": hvps_double_backward, "forward_over_reverse": hvps_forward_over_reverse}
