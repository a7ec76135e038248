"""Homogeneity (equivariance with B = k·I, catalog 9a/9b) by propagating polynomial degrees through the graph.

Scale a group of parameters by e^s and track, op by op, the degree k with which each tensor scales
(inputs 0, group parameters 1; linear maps add degrees, ReLU and pass-through ops keep them, a bias must
match its layer, normalisations return the degree of their affine parameters, other nonlinearities only
accept degree 0). When the model output has a well-defined degree k > 0, f(e^s θ_G) = e^{ks} f(θ): an
equivariance whose first-order identity is ⟨g, θ_G⟩ = k E[∇_fℓ·f] (implicit-bias / balancing relations).
Groups: all parameters, and the parameters of each linear map.
"""
from __future__ import annotations

from eqlab.analyses.discover.explain import reject
from eqlab.analyses.discover.graph import Graph
from eqlab.analyses.discover.algebra import activation_algebra
from eqlab.analyses.discover.ops import ELEMENTWISE_ACT, LINEAR_OPS, affine
from eqlab.analyses.discover.patterns import Candidate
from eqlab.analyses.transforms import ScaleFamily

_ADD = {"add", "sub", "__add__", "__sub__", "__radd__"}
_MUL = {"mul", "__mul__", "__rmul__"}


def _degree(graph: Graph, group: set[str]):
    deg: dict[int, int | None] = {}

    def d(t):
        name = graph.param(t)
        if name is not None:
            return 1 if name in group else 0
        return deg.get(id(t), 0)  # inputs, constants

    for op in graph.ops:
        ins = [op.leaves[p] for p in op.tensor_positions()]
        ds = [d(t) for t in ins]
        a = affine(graph, op) if op.name in LINEAR_OPS or op.name in ("batch_norm", "layer_norm") else None
        if any(x is None for x in ds):
            k = None
        elif a is not None and a.kind == "linear":
            k = d(a.data) + (1 if a.weight in group else 0)
            if a.bias is not None and (1 if a.bias in group else 0) != k:
                k = None
        elif a is not None and a.kind == "norm":
            wd = 1 if a.weight in group else 0
            bd = 1 if a.bias in group else 0
            k = wd if (a.bias is None or wd == bd) else None
        elif op.name in ELEMENTWISE_ACT and activation_algebra(op)[0]:  # relu, leaky_relu, clamp(min=0)
            k = ds[0]
        elif graph._data_input(op) is not None and graph.is_passthrough(op, graph._data_input(op)):
            k = d(op.leaves[graph._data_input(op)])
        elif op.name in _ADD:
            k = ds[0] if len(set(ds)) == 1 else None
        elif op.name in _MUL:
            k = sum(ds)
        else:
            k = 0 if all(x == 0 for x in ds) else None
        for o in op.outputs:
            deg.setdefault(id(o), k)
    return deg.get(id(graph.output))


def homogeneities(graph: Graph) -> list[Candidate]:
    if getattr(graph, "output", None) is None:
        return []
    linears = [a for a in (affine(graph, op) for op in graph.ops if op.name in LINEAR_OPS)
               if a is not None and a.kind == "linear"]
    everything = sorted({n for op in graph.ops for p in op.tensor_positions()
                         if (n := graph.param(op.leaves[p])) is not None})
    out = []
    k = _degree(graph, set(everything))
    if not k:
        reject("model output", "homogeneity", "the output has no single degree in all parameters (a bias, a "
               "normalisation or a non-homogeneous activation on the way)")
    if k:
        out.append(Candidate(ScaleFamily(f"homogeneity[all,k={k}]", "homogeneity",
                                         [[[n, None, None, 1.0] for n in everything]], output_scale=[k]), []))
    gens, scales = [], []
    for a in linears:
        group = {a.weight} | ({a.bias} if a.bias else set())
        kl = _degree(graph, group)
        if kl:
            gens.append([[n, None, None, 1.0] for n in sorted(group)])
            scales.append(kl)
    if gens:
        out.append(Candidate(ScaleFamily(f"layer_homogeneity[{len(gens)} layers]", "layer_homogeneity", gens,
                                         output_scale=scales), []))
    return out
