"""What the recorded ops mean for parameter axes: the feature axes of linear maps and per-channel layers.

Only the op's own calling convention is encoded here (F.linear weights are (out, in), torch.addmm(b, x, W)
weights are (in, out) as in transformers' Conv1D, conv weights are (out, in, *k)); which op a model uses
is read off the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eqlab.analyses.discover.algebra import Cause, eps_cause

LINEAR_OPS = {"linear", "addmm", "matmul", "mm", "conv1d", "conv2d", "conv3d"}
NORM_OPS = {"batch_norm", "layer_norm", "rms_norm"}  # rms_norm: also fused from its ops (norms.py)
HOMOGENEOUS_ACT = {"relu", "leaky_relu", "relu_"}         # positively 1-homogeneous: σ(αx) = ασ(x), α > 0
ELEMENTWISE_ACT = HOMOGENEOUS_ACT | {"gelu", "silu", "tanh", "sigmoid", "elu", "selu", "celu", "softplus",
                                     "mish", "hardswish", "hardtanh", "relu6", "softsign", "sin"}
ODD_ACT = {"tanh", "hardtanh", "softsign", "sin"}           # σ(-x) = -σ(x)
# Elementwise ops an activation may be written with (GPT-2's gelu_new: 0.5·x·(1 + tanh(c·(x + a·x³)))).
ELEMENTWISE_MATH = ELEMENTWISE_ACT | {
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "erf", "sqrt", "rsqrt", "abs", "clamp", "clamp_min",
    "clamp_max", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__pow__", "__rpow__", "__neg__"}


@dataclass
class Affine:
    """A per-feature affine producer/consumer: out[..., j] depends on weight slice j (axis ``w_out``) and
    bias[j]; input feature i is read by weight slice i (axis ``w_in``, None for norm layers)."""

    op: object
    data: torch.Tensor            # the data input tensor
    weight: str | None
    bias: str | None
    w_out: int | None             # axis of the weight indexing output features
    w_in: int | None              # axis of the weight indexing input features
    out_axis: int                 # feature axis of the output tensor
    in_axis: int                  # feature axis of the data input
    kind: str                     # "linear" | "norm" | "embedding"
    caveats: list = field(default_factory=list)


def _neg(axis, ndim):
    return axis if axis < 0 else axis - ndim


def affine(graph, op) -> Affine | None:
    """Interpret ``op`` as a per-feature affine map with parameter weight/bias, or None."""
    L, P = op.leaves, op.tensor_positions()
    out = op.outputs[0]
    if op.name == "linear":
        x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
        if graph.param(w) is None:
            return None
        return Affine(op, x, graph.param(w), graph.param(b), 0, 1, -1, -1, "linear")
    if op.name == "addmm":
        b, x, w = op.arg(0, "input"), op.arg(1, "mat1"), op.arg(2, "mat2")
        if graph.param(w) is None or op.arg(3, "beta", 1) != 1 or op.arg(4, "alpha", 1) != 1:
            return None
        return Affine(op, x, graph.param(w), graph.param(b), 1, 0, -1, -1, "linear")
    if op.name in ("matmul", "mm") and len(P) == 2:
        x, w = L[P[0]], L[P[1]]
        if graph.param(x) is not None or w.dim() != 2:
            return None
        if graph.param(w) is None:  # x @ W.T with W an (out, in) parameter (Falcon's FalconLinear)
            wt = transposed_param(graph, w)
            return None if wt is None else Affine(op, x, wt, None, 0, 1, -1, -1, "linear")
        return Affine(op, x, graph.param(w), None, 1, 0, -1, -1, "linear")
    if op.name.startswith("conv") and op.name[-2:] in ("1d", "2d", "3d"):
        x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
        groups = op.arg(6, "groups", 1)
        if graph.param(w) is None:
            return None
        if groups != 1:
            # output channel c still has its own filter w[c] (what a following BN or activation needs); as a
            # reader, input channel c is read by w[c] only for a depthwise conv (one input channel per group,
            # one output channel per input): w_in = 0 then, else no per-input-channel slice (None)
            depthwise = w.shape[1] == 1 and w.shape[0] == groups
            return Affine(op, x, graph.param(w), graph.param(b), 0, 0 if depthwise else None, 1, 1, "linear",
                          [f"grouped convolution (groups={groups})"])
        return Affine(op, x, graph.param(w), graph.param(b), 0, 1, 1, 1, "linear")
    if op.name == "batch_norm":
        x, w, b = op.arg(0, "input"), op.arg(3, "weight"), op.arg(4, "bias")
        eps, training = op.arg(7, "eps", 1e-5), op.arg(5, "training", False)
        a = Affine(op, x, graph.param(w), graph.param(b), 0, None, 1, 1, "norm",
                   [eps_cause(op, f"batch_norm eps={eps:g}: scale invariance is broken by ~eps/Var(pre-activation)")])
        if not training:
            a.caveats.append("batch_norm in eval mode normalises by running statistics (no invariance)")
        return a
    if op.name == "layer_norm":
        x, shape, w, b = op.arg(0, "input"), op.arg(1, "normalized_shape"), op.arg(2, "weight"), op.arg(3, "bias")
        if len(shape) != 1:
            return None
        eps = op.arg(4, "eps", 1e-5)
        return Affine(op, x, graph.param(w), graph.param(b), 0, None, -1, -1, "norm",
                      [eps_cause(op, f"layer_norm eps={eps:g}: scale invariance is broken by ~eps/Var(input)")])
    if op.name == "rms_norm":  # native F.rms_norm, or a normalisation fused from its ops (no mean subtraction)
        x, shape, w, eps = op.arg(0, "input"), op.arg(1, "normalized_shape"), op.arg(2, "weight"), op.arg(3, "eps")
        if len(shape) != 1:
            return None
        eps = 0.0 if eps is None else float(eps)
        cav = [eps_cause(op, f"rms_norm eps={eps:g}: scale invariance is broken by ~eps/mean(input²)")] if eps > 0 else []
        cav += getattr(op, "precision", [])
        return Affine(op, x, graph.param(w), None, 0, None, -1, -1, "norm", cav)
    if op.name == "embedding":
        ids, w = op.arg(0, "input"), op.arg(1, "weight")
        if graph.param(w) is None:
            return None
        return Affine(op, ids, graph.param(w), None, 1, None, -1, -1, "embedding")
    return None


def transposed_param(graph, t) -> str | None:
    """The 2-d parameter whose ``.T`` (a property read, recorded as ``__get__``) t is, or None."""
    prod = graph.producer(t)
    if prod is None or prod[0].name != "__get__":
        return None
    ps = [prod[0].leaves[p] for p in prod[0].tensor_positions() if graph.param(prod[0].leaves[p])]
    if len(ps) != 1 or ps[0].dim() != 2 or tuple(t.shape) != tuple(ps[0].shape[::-1]) or not torch.equal(t, ps[0].t()):
        return None
    return graph.param(ps[0])


def _only_feeds(graph, op, target) -> bool:
    """``op`` is a ``.T`` read whose result only ``target`` consumes: part of target, not another use."""
    return op.name == "__get__" and all(c is target for o in op.outputs for c, _ in graph.consumers(o))


def shared_caveats(graph, a: Affine) -> list[str]:
    """Parameters of ``a`` that other ops also read (tied embeddings, shared layers)."""
    out = []
    for name in (a.weight, a.bias):
        if name is None:
            continue
        others = {op.name for op, _ in graph.param_uses(name) if op is not a.op and not _only_feeds(graph, op, a.op)}
        if others:
            # hard: the candidate was built from this use only, so it moves the other uses unaccounted
            # (a tied unembedding scaled with the embedding); no eps can explain that violation away
            out.append(Cause(f"parameter {name} is shared with other ops ({', '.join(sorted(others))}), "
                             "e.g. tied embeddings: the transformation also moves those", "shared", soft=False))
    return out


def labels_out(graph, a: Affine, chain, end_axis):
    """Producer feature index carried at each position of ``end_axis`` of the end of ``chain``."""
    from eqlab.analyses.discover.graph import axis_labels

    out = a.op.outputs[0]
    return axis_labels(chain, tuple(out.shape), out.dim() + _neg(a.out_axis, out.dim()), end_axis)
