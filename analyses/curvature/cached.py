"""The first-order graph of one fixed batch, built once and reused for every HVP (PyHessian's trick).

An HVP by double backward is forward + first backward (``create_graph``) + second backward. For a
fixed batch and fixed parameter values the first two are the same every time, so `CachedGraph` runs
them once and keeps the graph of the gradient g(θ) (``retain_graph`` on every product); each HVP is
then only the second backward ``grad(g, θ, v)``. Exact: the same computation as `hvp_double_backward`.

Price: the graph's saved tensors stay alive for the operator's lifetime, for *every* batch. `nbytes`
measures them (saved-tensor hooks over the forward and the create_graph backward, each storage counted
once), so the operator can refuse to cache when the total would be too large (see `operator.py`).

Staleness: the graph is a function of the parameter and buffer values at build time. The owner
records their version counters (`fingerprint`) and rebuilds when any tensor was changed in place
(e.g. a BatchNorm running statistic or a loaded state dict), so a product never uses stale values.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from analyses.curvature.functional import ParamDict


def watched_tensors(model: nn.Module, params: Mapping[str, Tensor]) -> list[Tensor]:
    """Every tensor the loss may read (parameters and buffers), collected once: walking the module
    tree on every product cost ~0.2 ms per HVP (10% of one on the tiny GPT-2)."""
    return list(model.parameters()) + [b for b in model.buffers() if b is not None] + list(params.values())


def fingerprint(model: nn.Module, params: Mapping[str, Tensor], tensors: list[Tensor] | None = None) -> tuple:
    """Identity and in-place version of every tensor the loss may read (parameters and buffers).

    ``tensors``: a list from `watched_tensors`, to skip the module walk. It sees in-place changes
    (``load_state_dict``, BatchNorm statistics, ``mul_``); re-assigning a module's tensor attribute
    on the operator's private copy is not supported."""
    ts = watched_tensors(model, params) if tensors is None else tensors
    return tuple((id(t), t._version) for t in ts)


class CachedGraph:
    """g(θ) with its graph for one batch; `hvp`/`hvps` reuse it (module doc).

    The graph is built on *one flat leaf* θ (the parameters are views of its pieces, in ``names``
    order), so g is one flat tensor and every product is ``grad(g, θ, v)`` with one output and one
    input: no per-parameter split, cat or gradient bookkeeping per product (−10% per HVP on the
    1-layer GPT-2 against one leaf per parameter). Unused parameters and parameters the loss uses
    linearly simply get zero rows.
    """

    def __init__(self, L: Callable, params: Mapping[str, Tensor]):
        seen: dict[tuple, int] = {}

        def pack(t):  # count each saved storage once; the tensor itself is kept unchanged
            try:
                s = t.untyped_storage()
                seen[(s.data_ptr(), t.device)] = s.nbytes()
            except Exception:  # noqa: BLE001  (e.g. tensors without storage): not measurable, skip
                pass
            return t

        self.names = list(params)
        self.shapes = {n: params[n].shape for n in self.names}
        self.sizes = [params[n].numel() for n in self.names]
        first = params[self.names[0]]
        flat = torch.cat([params[n].detach().reshape(-1) for n in self.names]).requires_grad_(True)
        pieces = flat.split(self.sizes)
        ps = {n: t.view(self.shapes[n]) for n, t in zip(self.names, pieces)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = L(ps)
            (g,) = torch.autograd.grad(value, flat, create_graph=True, allow_unused=True, materialize_grads=True)
        self.flat, self.dtype, self.device = flat, first.dtype, first.device
        # g does not require grad when the loss is at most linear in every parameter: H = 0 exactly
        self.g = g if g.requires_grad else None
        self.value = value.detach()
        self.nbytes = int(sum(seen.values()))

    def hvp_flat(self, v: Tensor) -> Tensor:
        """H v for a flat ``v`` laid out in ``names`` order."""
        if self.g is None:
            return torch.zeros_like(v)
        return torch.autograd.grad(self.g, self.flat, grad_outputs=v, retain_graph=True)[0]

    def hvps_flat(self, V: Tensor) -> Tensor:
        """H·V for ``V`` of shape (k, dim): one vmapped second backward (``is_grads_batched``)."""
        if self.g is None:
            return torch.zeros_like(V)
        return torch.autograd.grad(self.g, self.flat, grad_outputs=V, retain_graph=True, is_grads_batched=True)[0]

    def _flatten(self, v: Mapping[str, Tensor], lead=()) -> Tensor:
        return torch.cat([v[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def _unflatten(self, x: Tensor, lead=()) -> ParamDict:
        return {n: t.reshape(*lead, *self.shapes[n]) for n, t in zip(self.names, x.split(self.sizes, dim=-1))}

    def hvp(self, v: Mapping[str, Tensor]) -> ParamDict:
        return self._unflatten(self.hvp_flat(self._flatten(v)))

    def hvps(self, V: Mapping[str, Tensor]) -> ParamDict:
        """H·V for ``V = {name: (k, *shape)}``."""
        k = V[self.names[0]].shape[0]
        return self._unflatten(self.hvps_flat(self._flatten(V, (k,))), (k,))
