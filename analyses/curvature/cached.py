"""The first-order graph of one fixed batch, built once and reused for every HVP (PyHessian's trick).

An HVP by double backward is forward + first backward (``create_graph``) + second backward. For a
fixed batch and fixed parameter values the first two are the same every time, so `CachedGraph` runs
them once and keeps the graph of the gradient g(θ) (``retain_graph`` on every product); each HVP is
then only the second backward ``grad(g, θ, v)``. Exact: the same computation as `hvp_double_backward`.

Price: the graph's saved tensors stay alive for the operator's lifetime, for *every* batch. `nbytes`
measures them (a walk over the graph's nodes reading what each one saved, each storage counted once),
so the operator can refuse to cache when the total would be too large (see `operator.py`).

Staleness: the graph is a function of the parameter and buffer values at build time. The owner
records their version counters (`fingerprint`) and rebuilds when any tensor was changed in place
(e.g. a BatchNorm running statistic or a loaded state dict), so a product never uses stale values.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from eqlab.analyses.curvature.functional import ParamDict


def watched_tensors(model: nn.Module, params: Mapping[str, Tensor]) -> list[Tensor]:
    """Every tensor the loss may read (parameters and buffers), collected once: walking the module
    tree on every product cost ~0.2 ms per HVP (10% of one on the tiny GPT-2)."""
    return list(model.parameters()) + [b for b in model.buffers() if b is not None] + list(params.values())


def fingerprint(model: nn.Module, params: Mapping[str, Tensor], tensors: list[Tensor] | None = None) -> tuple:
    """Identity and in-place version of every tensor the loss may read (parameters and buffers).

    ``tensors``: a list from `watched_tensors`, to skip the module walk. It sees in-place changes
    (``load_state_dict``, BatchNorm statistics, ``mul_``); re-assigning a module's tensor attribute
    on the operator's private copy is not supported."""
    if tensors is not None:  # the list holds the tensors, so their identities cannot change: versions only
        return tuple([t._version for t in tensors])
    return tuple([(id(t), t._version) for t in watched_tensors(model, params)])


def _saved_attributes(node_type: type) -> tuple[str, ...]:
    """Names under which an autograd node exposes its saved tensors (C++ nodes: ``_saved_*``;
    custom Python functions: ``saved_tensors``)."""
    if node_type not in _SAVED_NAMES:
        _SAVED_NAMES[node_type] = tuple(a for a in dir(node_type) if a.startswith("_saved_") or a == "saved_tensors")
    return _SAVED_NAMES[node_type]


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def walk_graph(root) -> tuple[int, list[Tensor]]:
    """(Bytes of every tensor the graph below ``root`` keeps saved, each storage counted once; the leaf
    tensors it accumulates into). One pass over the nodes at build time: saved-tensor hooks would
    measure the same but stay attached to the graph and run a Python call for every saved tensor on
    every product (85 per HVP on the 1-layer GPT-2, 3% of its cost)."""
    storages: dict[tuple, int] = {}
    leaves: list[Tensor] = []
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.append(node.variable)
        for name in _saved_attributes(type(node)):
            try:
                value = getattr(node, name)
            except Exception:  # noqa: BLE001  (a freed or non-tensor saved value): nothing to count
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if torch.is_tensor(t):
                    try:
                        st = t.untyped_storage()
                        storages[(st.data_ptr(), t.device)] = st.nbytes()
                    except Exception:  # noqa: BLE001  (tensors without storage): not measurable
                        pass
        stack.extend(f for f, _ in node.next_functions)
    return int(sum(storages.values())), leaves


try:  # the engine entry point that torch.autograd.grad/backward wrap (their Python checks cost 50 µs per call)
    from torch.autograd import Variable
    _run_backward = Variable._execution_engine.run_backward
except (ImportError, AttributeError):  # pragma: no cover  (another torch: the public path below)
    _run_backward = None


class CachedGraph:
    """g(θ) with its graph for one batch; `hvp`/`hvps` reuse it (module doc).

    The graph is built on *one flat leaf* θ (the parameters are views of its pieces, in ``names``
    order), so g is one flat tensor and every product is ``grad(g, θ, v)`` with one output and one
    input: no per-parameter split, cat or gradient bookkeeping per product (−10% per HVP on the
    1-layer GPT-2 against one leaf per parameter). Unused parameters and parameters the loss uses
    linearly simply get zero rows.

    Products call the autograd engine directly (``torch.autograd.grad``'s Python checks cost ≈ 0.05 ms a
    call). When θ is the graph's only leaf (the operator's private model has no other tensor that
    requires grad) and small (``ACCUMULATE_MAX``), a product runs the engine over the whole graph and
    accumulates into ``θ.grad``, which is taken and reset: the same arithmetic without the per-call
    search for the nodes leading to θ (−4% per HVP on the tiny GPT-2). Tests check both paths against
    ``torch.autograd.grad``, bit for bit.
    """

    # Accumulating saves the per-call node search (≈ 0.06 ms on the tiny GPT-2), but AccumulateGrad copies
    # the gradient into θ.grad: +30 ms per product at 22.6M parameters (MiniLM, 0.52 vs 0.49 s). A copy
    # of 64k floats costs about what the search does, so larger spaces pass θ as the engine's input.
    ACCUMULATE_MAX = 1 << 16

    def __init__(self, L: Callable, params: Mapping[str, Tensor]):
        self.names = list(params)
        self.shapes = {n: params[n].shape for n in self.names}
        self.sizes = [params[n].numel() for n in self.names]
        first = params[self.names[0]]
        flat = torch.cat([params[n].detach().reshape(-1) for n in self.names]).requires_grad_(True)
        pieces = flat.split(self.sizes)
        # a 1-D piece already has its shape: no view, so no extra node for every product to walk
        ps = {n: t if t.shape == self.shapes[n] else t.view(self.shapes[n]) for n, t in zip(self.names, pieces)}
        value = L(ps)
        (g,) = torch.autograd.grad(value, flat, create_graph=True, allow_unused=True, materialize_grads=True)
        self.flat, self.dtype, self.device = flat, first.dtype, first.device
        # g does not require grad when the loss is at most linear in every parameter: H = 0 exactly
        self.g = g if g.requires_grad else None
        self.value = value.detach()
        self.nbytes, leaves = walk_graph(g.grad_fn) if self.g is not None else (0, [])
        self.accumulate = (_run_backward is not None and len(leaves) == 1 and leaves[0] is flat
                           and flat.numel() <= self.ACCUMULATE_MAX)

    def hvp_flat(self, v: Tensor) -> Tensor:
        """H v for a flat ``v`` laid out in ``names`` order."""
        if self.g is None:
            return torch.zeros_like(v)
        if self.accumulate:
            if self.flat.grad is not None:  # left over by a product that raised half-way
                self.flat.grad = None
            _run_backward((self.g,), (v,), True, False, (), False, True)  # keep graph, accumulate into θ.grad
            hv, self.flat.grad = self.flat.grad, None  # θ is a leaf of g's graph, so this is set
            return hv
        if _run_backward is not None:  # torch.autograd.grad without its Python-side checks
            return _run_backward((self.g,), (v,), True, False, (self.flat,), False, False)[0]
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
