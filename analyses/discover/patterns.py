"""Graph patterns that carry a symmetry, each turned into a `Transformation` plus caveats.

Every finder walks the recorded op graph (analyses.discover.graph) from an anchor op (a softmax, a
batch_norm, an activation, an attention score matmul, ...) to the parameterised ops around it. Caveats are
the things seen on the way that are expected to break the symmetry (norm eps, a non-homogeneous activation,
shared parameters, extra consumers); verification decides, the caveats explain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analyses.discover.graph import Graph, axis_labels
from analyses.discover.ops import (ELEMENTWISE_ACT, HOMOGENEOUS_ACT, LINEAR_OPS, NORM_OPS, ODD_ACT, Affine,
                                   affine, labels_out, shared_caveats)
from analyses.transforms import Permutation, ScaleFamily, SignFlip, Transformation, TranslationFamily


@dataclass
class Candidate:
    transformation: Transformation
    caveats: list = field(default_factory=list)


def _short(name: str | None) -> str:
    return (name or "?").removesuffix(".weight").removesuffix(".bias")


def _producer_affine(graph: Graph, t, kinds=("linear",), pooling=False):
    """The affine op that produces t through pass-through ops: (Affine, chain) or (None, None)."""
    origin, chain = graph.walk_back(t, pooling=pooling)
    prod = graph.producer(origin)
    if prod is None:
        return None, None
    a = affine(graph, prod[0])
    if a is None or a.kind not in kinds or a.op.outputs[0] is not origin:
        return None, None
    return a, chain


def _groups(labels):
    """producer feature -> ordered list of end positions carrying it."""
    out: dict[int, list[int]] = {}
    for j, r in enumerate(labels):
        out.setdefault(r, []).append(j)
    return out


# ------------------------------------------------------------------------------------ (a) softmax translation
def softmax_translations(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops_named("cross_entropy", "log_softmax", "softmax"):
        x = op.leaves[op.tensor_positions()[0]]
        if op.name == "cross_entropy":
            dim = 1 if x.dim() > 1 else 0
        else:
            dim = op.arg(1, "dim", -1)
        dim = dim % x.dim()
        a, chain = _producer_affine(graph, x)
        if a is None or a.weight is None:
            continue
        labels = labels_out(graph, a, chain, dim)
        if labels is None or len(set(labels)) != len(labels):
            continue
        rows = sorted(labels)
        shapes = {a.weight: list(_shape(graph, a.weight))}
        terms = [[a.weight, a.w_out, rows, "broadcast"]]
        if a.bias is not None:
            shapes[a.bias] = list(_shape(graph, a.bias))
            terms.append([a.bias, 0, rows, "broadcast"])
        t = TranslationFamily(f"softmax_translation[{_short(a.weight)}]", "softmax_translation", terms, shapes)
        cav = shared_caveats(graph, a)
        if not graph.single_consumer_chain(a.op.outputs[0], chain):
            cav.append("the logits are also read outside the softmax (e.g. a z-loss or logit penalty)")
        out.append(Candidate(t, cav))
    return out


def _shape(graph: Graph, name: str):
    for op, pos in graph.param_uses(name):
        return tuple(op.leaves[pos].shape)
    raise KeyError(name)


# ------------------------------------------------------------------------------- (b) BatchNorm scale, shift
def batchnorm_scales(graph: Graph) -> list[Candidate]:
    out = []
    for op in graph.ops_named("batch_norm"):
        bn = affine(graph, op)
        a, chain = _producer_affine(graph, bn.data)
        if a is None:
            continue
        labels = labels_out(graph, a, chain, 1)
        if labels is None:
            continue
        cav = list(bn.caveats) + shared_caveats(graph, a)
        if not graph.single_consumer_chain(a.op.outputs[0], chain + [(op, 0, 0)]):
            cav.append("the pre-normalisation activations are also read elsewhere")
        per_channel = [[r] for r in labels]  # BN channel c is fed by producer features labels[c]
        gens = [[[a.weight, a.w_out, rs, 1.0]] + ([[a.bias, 0, rs, 1.0]] if a.bias else []) for rs in per_channel]
        nm = f"{_short(a.weight)}->{_short(bn.weight) if bn.weight else 'batch_norm'}"
        out.append(Candidate(ScaleFamily(f"bn_scale[{nm}]", "bn_scale", gens), cav))
        if a.bias is not None:  # the mean subtraction removes any per-channel constant (catalog 2d)
            sh = {a.bias: list(_shape(graph, a.bias))}
            tf = TranslationFamily(f"bn_translation[{nm}]", "bn_translation",
                                   [[a.bias, 0, sorted(labels), "free"]], sh)
            out.append(Candidate(tf, [c for c in cav if "eval mode" in c]))
    return out


# --------------------------------------------------------------------- (c) rescale across an activation
@dataclass
class Pair:
    """producer (per-feature affine) -> [activation] -> consumer (linear reading those features)."""

    producer: Affine
    act: str | None
    consumer: Affine
    groups: dict              # producer feature -> consumer input positions (along consumer.w_in)
    caveats: list
    upstream: Affine | None = None  # for a norm producer: the linear map feeding it (for permutations)
    up_labels: list | None = None


def activation_pairs(graph: Graph) -> list[Pair]:
    pairs = []
    anchors = [op for op in graph.ops if op.name in ELEMENTWISE_ACT]
    # a norm layer's affine read directly by a linear map (LN gain -> next linear, no activation)
    anchors += [op for op in graph.ops if op.name in NORM_OPS]
    for op in anchors:
        if op.name in NORM_OPS:
            prod, act, pchain = affine(graph, op), None, []
            if prod is None or prod.weight is None:
                continue
            start = op.outputs[0]
        else:
            x = op.leaves[op.tensor_positions()[0]]
            prod, pchain = _producer_affine(graph, x, kinds=("linear", "norm"))
            if prod is None or prod.weight is None:
                continue
            act, start = op.name, op.outputs[0]
        end, cchain, cons = graph.walk_forward(start, pooling=act is not None)
        if len(cons) != 1:
            continue
        cop, cpos = cons[0]
        consumer = affine(graph, cop)
        if consumer is None or consumer.kind != "linear" or consumer.data is not end:
            continue
        full = pchain + ([(op, op.tensor_positions()[0], 0)] if act else []) + cchain
        labels = labels_out(graph, prod, full, end.dim() + (consumer.in_axis if consumer.in_axis < 0 else
                                                            consumer.in_axis - end.dim()))
        if labels is None:
            continue
        cav = shared_caveats(graph, prod) + shared_caveats(graph, consumer)
        if not graph.single_consumer_chain(prod.op.outputs[0], pchain + ([(op, 0, 0)] if act else [])):
            cav.append("the producer's output is also read elsewhere (e.g. a residual connection)")
        up, up_labels = None, None
        if prod.kind == "norm" and prod.op.name == "batch_norm":
            up, uchain = _producer_affine(graph, prod.data)
            up_labels = labels_out(graph, up, uchain, 1) if up is not None else None
        pairs.append(Pair(prod, act, consumer, _groups(labels), cav, up, up_labels))
    return pairs


def _rescale_generators(p: Pair, sign_out: float = -1.0):
    gens = []
    for r, js in sorted(p.groups.items()):
        g = [[p.producer.weight, p.producer.w_out, [r], 1.0]]
        if p.producer.bias:
            g.append([p.producer.bias, 0, [r], 1.0])
        g.append([p.consumer.weight, p.consumer.w_in, js, sign_out])
        gens.append(g)
    return gens


def _pair_name(p: Pair):
    return f"{_short(p.producer.weight)}->{_short(p.consumer.weight)}"


def rescales(graph: Graph, pairs=None) -> list[Candidate]:
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act is None:
            family = "ln_gain_rescale" if p.producer.op.name == "layer_norm" else "bn_gain_rescale"
            name = family
            cav = list(p.caveats)
        else:
            family = "relu_rescale" if p.act in HOMOGENEOUS_ACT else f"{p.act}_rescale"
            name = family
            cav = list(p.caveats)
            if p.act not in HOMOGENEOUS_ACT:
                cav.append(f"activation {p.act} is not positively homogeneous (σ(αx) ≠ ασ(x))")
        out.append(Candidate(ScaleFamily(f"{name}[{_pair_name(p)}]", family, _rescale_generators(p)), cav))
    return out


# ------------------------------------------------------------------------------- (d) negative controls
def negative_controls_from(graph: Graph, pairs=None) -> list[Transformation]:
    """Declared transformations that are NOT symmetries; a correct checker must reject them."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act in HOMOGENEOUS_ACT:  # wrong sign: scale in- and outgoing weights together
            out.append(ScaleFamily(f"relu_rescale_wrong_sign[{_pair_name(p)}]", "negative_control",
                                   _rescale_generators(p, sign_out=+1.0), expected=False))
    for c in softmax_translations(graph):
        t = c.transformation
        w = t.terms[0]
        rows = w[2][:1]  # shift a single class only: changes the softmax
        terms = [[w[0], w[1], rows, "broadcast"]] + [[b[0], 0, rows, "broadcast"] for b in t.terms[1:]]
        out.append(TranslationFamily(f"softmax_translation_one_class[{t.name.split('[')[1]}", "negative_control",
                                     terms, t.shapes, expected=False))
    return out


# --------------------------------------------------------------------- (g) permutations and sign flips
def _unit_terms(p: Pair, r: int, js, perm=None):
    """Slices moving together with producer feature r (and the linear map feeding a BN producer)."""
    terms = [[p.producer.weight, p.producer.w_out], [p.consumer.weight, p.consumer.w_in]]
    if p.producer.bias:
        terms.insert(1, [p.producer.bias, 0])
    if p.upstream is not None:
        terms += [[p.upstream.weight, p.upstream.w_out]] + ([[p.upstream.bias, 0]] if p.upstream.bias else [])
    return terms


def permutations(graph: Graph, pairs=None, shapes=None) -> list[Candidate]:
    """Swap the first two hidden units of every producer -> activation -> consumer pair (any elementwise
    activation; through a BatchNorm the filter feeding it moves too)."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act is None or len(p.groups) < 2:
            continue
        if p.producer.kind == "norm" and (p.upstream is None or p.up_labels is None
                                          or p.up_labels != list(range(len(p.up_labels)))):
            continue
        feats = sorted(p.groups)
        i, j = feats[0], feats[1]
        if len(p.groups[i]) != len(p.groups[j]):
            continue
        terms = []
        for name, dim in _unit_terms(p, i, None):
            n = _shape(graph, name)[dim]
            perm = list(range(n))
            if name == p.consumer.weight:
                for a, b in zip(p.groups[i], p.groups[j]):
                    perm[a], perm[b] = b, a
            else:
                perm[i], perm[j] = j, i
            terms.append([name, dim, perm])
        out.append(Candidate(Permutation(f"permutation[{_pair_name(p)}]({i}<->{j})", "permutation", terms),
                             list(p.caveats)))
    return out


def sign_flips(graph: Graph, pairs=None) -> list[Candidate]:
    """Negate one unit (in- and outgoing weights) behind an odd activation."""
    out = []
    for p in pairs if pairs is not None else activation_pairs(graph):
        if p.act not in ODD_ACT or p.producer.kind != "linear":
            continue
        r = sorted(p.groups)[0]
        terms = [[p.producer.weight, p.producer.w_out, [r]], [p.consumer.weight, p.consumer.w_in, p.groups[r]]]
        if p.producer.bias:
            terms.insert(1, [p.producer.bias, 0, [r]])
        cav = list(p.caveats)
        out.append(Candidate(SignFlip(f"sign_flip[{_pair_name(p)}]({r})", "sign_flip", terms), cav))
    return out
