"""Find the symmetries a model carries by walking its computation graph, and verify each one numerically.

    d = discover(model, loss, batch)
    d.verified            # transformations that hold in float64 on the batch (finite elements + identities)
    d.broken              # Found entries that failed, with the measured violation and the likely reason
    negative_controls(model, loss, batch)   # declared non-symmetries the pipeline checks alongside

Nothing found is dropped: a candidate that fails verification is reported with ``verified=False``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from eqlab.analyses.discover import attention, gated, homogeneity, residual
from eqlab.analyses.discover.graph import trace
from eqlab.analyses.discover.patterns import (activation_pairs, batchnorm_scales, negative_controls_from, permutations,
                                        rescales, sign_flips, softmax_translations,
                                        unused_parameters)
from eqlab.analyses.curvature.operator import active_dropout
from eqlab.analyses.identities import check_all
from eqlab.analyses.transforms import Transformation

__all__ = ["Discovery", "Found", "discover", "negative_controls", "candidates"]


@dataclass
class Found:
    transformation: Transformation
    verified: bool
    residual: float                 # max over the checked orders (float64, on the batch)
    residuals: dict                 # order -> residual
    caveats: list = field(default_factory=list)
    reason: str = ""                # why it is broken ("" when verified)

    def as_row(self) -> dict:
        t = self.transformation
        return {"transformation": t.name, "family": t.family, "kind": t.kind, "n_generators": t.n_generators,
                "verified": self.verified, "residual": float(self.residual),
                **{f"residual_{k}": float(v) for k, v in sorted(self.residuals.items())},
                "reason": self.reason, "caveats": "; ".join(self.caveats)}


@dataclass
class Discovery:
    found: list

    @property
    def verified(self) -> list:
        return [f.transformation for f in self.found if f.verified]

    @property
    def broken(self) -> list:
        return [f for f in self.found if not f.verified]

    def families(self, verified_only=True) -> dict:
        """family -> total number of generators (continuous) or of transformations (discrete)."""
        out: dict[str, int] = {}
        for f in self.found:
            if f.verified or not verified_only:
                out[f.transformation.family] = out.get(f.transformation.family, 0) + f.transformation.n_generators
        return out

    def by_name(self, name: str) -> Found:
        return next(f for f in self.found if f.transformation.name == name)

    def as_rows(self) -> list:
        return [f.as_row() for f in self.found]


def _subset(batch, n):
    inputs, targets = batch
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}, targets[:n]
    return inputs[:n], targets[:n]


def _double(batch):
    inputs, targets = batch
    cast = lambda x: x.double() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    if isinstance(inputs, dict):
        return {k: cast(v) for k, v in inputs.items()}, cast(targets)
    return cast(inputs), cast(targets)


def candidates(model, loss, batch, trace_examples: int = 4):
    """(candidates, negative controls) from one recorded forward pass; no verification."""
    graph = trace(model, loss, _subset(batch, trace_examples))
    pairs = activation_pairs(graph)
    found = (softmax_translations(graph) + batchnorm_scales(graph) + rescales(graph, pairs)
             + gated.gated_units(graph) + attention.attention_groups(graph) + residual.residual_stream(graph) + homogeneity.homogeneities(graph)
             + permutations(graph, pairs) + sign_flips(graph, pairs) + unused_parameters(graph))
    return found, negative_controls_from(graph, pairs)


def negative_controls(model, loss, batch, trace_examples: int = 4) -> list[Transformation]:
    """Transformations that look like the discovered ones but are not symmetries (wrong-sign ReLU
    rescale, a one-class logit shift). ``expected=False``: checks report ``ok`` when they are rejected."""
    return candidates(model, loss, batch, trace_examples)[1]


def discover(model, loss, batch, *, verify_examples: int = 32, trace_examples: int = 4, probes: int = 1,
             seed: int = 0) -> Discovery:
    """Transformations found in the graph of ``loss(model(inputs), targets)``, each verified in float64 on
    (the first ``verify_examples`` of) the batch: a finite group element (order 0) and the first- and
    second-order identities. ``model`` is not modified (BN running statistics are restored)."""
    cands, _ = candidates(model, loss, batch, trace_examples)
    m64 = copy.deepcopy(model).double()
    b64 = _double(_subset(batch, verify_examples))
    # Active dropout draws new masks on every forward, so the loss is a different function each time
    # and no identity can be verified; say so instead of an "unidentified" violation.
    dropout = active_dropout(model)
    random_loss = [f"active dropout makes the loss random ({', '.join(dropout)}); verify in eval() mode"] \
        if dropout else []
    out = []
    for c in cands:
        checks = check_all(m64, loss, b64, [c.transformation], probes=probes, seed=seed)
        res = {ch.order: ch.residual for ch in checks}
        ok = all(ch.holds for ch in checks)
        worst = max(res.values())
        reason = "" if ok else ("; ".join(random_loss + c.caveats) or "violated for an unidentified reason") + \
            f" (measured residual {worst:.2e})"
        out.append(Found(c.transformation, ok, worst, res, list(c.caveats), reason))
    return Discovery(out)
