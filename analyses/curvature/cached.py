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

from analyses.curvature.functional import ParamDict, _leaves


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
    """g(θ) with its graph for one batch; `hvp`/`hvps` reuse it (module doc)."""

    def __init__(self, L: Callable, params: Mapping[str, Tensor]):
        seen: dict[tuple, int] = {}

        def pack(t):  # count each saved storage once; the tensor itself is kept unchanged
            try:
                s = t.untyped_storage()
                seen[(s.data_ptr(), t.device)] = s.nbytes()
            except Exception:  # noqa: BLE001  (e.g. tensors without storage): not measurable, skip
                pass
            return t

        ps = _leaves(params)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = L(ps)
            grads = torch.autograd.grad(value, list(ps.values()), create_graph=True, allow_unused=True)
        self.names = list(ps)
        self.leaves = list(ps.values())
        self.shapes = {n: p for n, p in ps.items()}
        # Rows of parameters the loss never uses, or uses linearly, are exactly zero: not in the graph.
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.live]
        self.value = value.detach()
        self.nbytes = int(sum(seen.values()))

    def _zeros(self, lead=()) -> ParamDict:
        return {n: torch.zeros((*lead, *p.shape), dtype=p.dtype, device=p.device) for n, p in self.shapes.items()}

    def _pack(self, cols, lead=()) -> ParamDict:
        # zeros only where needed: on a 22M-parameter model a full zero dict is a 90 MB memset per HVP
        return {n: c if c is not None else torch.zeros((*lead, *p.shape), dtype=p.dtype, device=p.device)
                for (n, p), c in zip(self.shapes.items(), cols)}

    def hvp(self, v: Mapping[str, Tensor]) -> ParamDict:
        if not self.grads:
            return self._zeros()
        cols = torch.autograd.grad(self.grads, self.leaves, grad_outputs=[v[self.names[i]] for i in self.live],
                                   retain_graph=True, allow_unused=True)
        return self._pack(cols)

    def hvp_flat(self, v: Tensor) -> Tensor:
        """H v for a flat ``v`` laid out in ``self.names`` order: one split and one cat, no dicts (on
        small models the dict round trip was ~5% of a product)."""
        sizes = [p.numel() for p in self.leaves]
        if not self.grads:
            return torch.zeros_like(v)
        parts = torch.split(v, sizes)
        cols = torch.autograd.grad(self.grads, self.leaves,
                                   grad_outputs=[parts[i].view(self.leaves[i].shape) for i in self.live],
                                   retain_graph=True, allow_unused=True)
        return torch.cat([c.reshape(-1) if c is not None else v.new_zeros(n) for c, n in zip(cols, sizes)])

    def hvps(self, V: Mapping[str, Tensor]) -> ParamDict:
        """H·V for ``V = {name: (k, *shape)}``: one vmapped second backward (``is_grads_batched``)."""
        k = next(iter(V.values())).shape[0]
        if not self.grads:
            return self._zeros((k,))
        cols = torch.autograd.grad(self.grads, self.leaves, grad_outputs=[V[self.names[i]] for i in self.live],
                                   retain_graph=True, allow_unused=True, is_grads_batched=True)
        return self._pack(cols, (k,))

    def hvps_loop(self, V: Mapping[str, Tensor]) -> ParamDict:
        """H·V column by column on the cached graph (where vmap over the backward is unsupported)."""
        k = next(iter(V.values())).shape[0]
        cols = [self.hvp({n: t[j] for n, t in V.items()}) for j in range(k)]
        return {n: torch.stack([c[n] for c in cols]) for n in self.names}
