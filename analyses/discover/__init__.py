"""Find the symmetries a model carries by walking its computation graph, and verify each one numerically.

    d = discover(model, loss, batch)
    d.verified            # the exact ones: every identity within its rounding level, on the batch and on inputs x3
    d.with_verdict("approximate")  # a measured violation with a known soft cause (a norm eps), its size
    d.broken              # every Found entry that is not exact, with the measured violation and the reason
    d.rejected            # candidates a pattern finder considered and did not propose, each with its reason
    negative_controls(model, loss, batch)   # declared non-symmetries the pipeline checks alongside
    negative_controls(model, loss, batch, all_families=True)  # + those of bias transfers, layer/offset scales

Nothing found is dropped: a candidate that fails verification is reported with its verdict and reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from eqlab.analyses.discover import (attention, experts, explain, gated, homogeneity, layer_scale, offset_gain,
                                     residual, transfers)
from eqlab.analyses.discover.algebra import Cause
from eqlab.analyses.discover.graph import trace
from eqlab.analyses.discover.patterns import (activation_pairs, batchnorm_scales, negative_controls_from, permutations,
                                        rescales, sign_flips, softmax_translations,
                                        unused_parameters)
from eqlab.analyses.curvature.operator import active_dropout
from eqlab.analyses.discover.verdicts import BROKEN, EXACT, INPUT_SCALE, classify, finite_checks, scaled_inputs
from eqlab.analyses.identities import check_all, unit_roundoff
from eqlab.analyses.transforms import Transformation

__all__ = ["Discovery", "Found", "discover", "negative_controls", "candidates", "affine_family_controls"]


@dataclass
class Found:
    transformation: Transformation
    verified: bool                  # verdict == "exact"
    residual: float                 # max over the checked orders (float64, on the batch)
    residuals: dict                 # order -> residual
    caveats: list = field(default_factory=list)
    reason: str = ""                # why it is approximate or broken ("" when exact)
    verdict: str = "exact"          # "exact" | "approximate" | "broken" (analyses.discover.verdicts)
    tolerance: float = 0.0          # the rounding level p·γ_n(u)·R at the worst order (identities)
    cause: str = ""                 # "eps", "algebra", "caveat", "inputs_x3", ... ("" when exact)
    residual_x3: float = float("nan")  # worst residual on the batch with floating inputs ×3 (NaN: not run)

    def as_row(self) -> dict:
        t = self.transformation
        return {"transformation": t.name, "family": t.family, "kind": t.kind, "n_generators": t.n_generators,
                "verified": self.verified, "verdict": self.verdict, "control": not t.expected,
                "residual": float(self.residual),
                "tolerance": float(self.tolerance), "residual_x3": float(self.residual_x3),
                **{f"residual_{k}": float(v) for k, v in sorted(self.residuals.items())},
                "cause": self.cause, "reason": self.reason, "caveats": "; ".join(self.caveats)}


@dataclass
class Discovery:
    found: list
    rejected: list = field(default_factory=list)   # explain.Rejection: considered, not proposed, and why

    @property
    def verified(self) -> list:
        return [f.transformation for f in self.found if f.verified]

    @property
    def broken(self) -> list:
        """Everything not exact (approximate and broken)."""
        return [f for f in self.found if not f.verified]

    def with_verdict(self, verdict: str) -> list:
        return [f for f in self.found if f.verdict == verdict]

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
    moved = transfers.transfers(graph)                                  # bias transfers (affine elements)
    scales = layer_scale.layer_scales(graph) + offset_gain.offset_gains(graph)
    found = (softmax_translations(graph) + batchnorm_scales(graph) + rescales(graph, pairs)
             + gated.gated_units(graph) + attention.attention_groups(graph) + residual.residual_stream(graph, pairs)
             + homogeneity.homogeneities(graph)
             + permutations(graph, pairs) + sign_flips(graph, pairs) + unused_parameters(graph) + moved + scales
             + experts.experts(graph))
    return _as_controls(_unique_names(found)), negative_controls_from(graph, pairs)


def _as_controls(found):
    """A candidate that a hard cause breaks (the op algebra: GELU is not homogeneous; a shared weight's other
    use; a softcap) is proposed so that its violation is measured, but it is known not to be a symmetry:
    it is a control (``expected=False``), so the identity checks record it as one (``control``, verdict
    rejected / not_discriminating), never as a symmetry that is ``violated``."""
    for c in found:
        if any(isinstance(cv, Cause) and not cv.soft for cv in c.caveats):
            c.transformation.expected = False
    return found


def affine_family_controls(cands) -> list[Transformation]:
    """The negative controls of the bias transfers, layer scales and offset gains among ``cands``: a transfer
    with the wrong sign or one reader left out, a layer scale with the wrong sign, an offset gain rescaled
    as if it had no offset."""
    return transfers.controls(cands) + layer_scale.controls(cands) + offset_gain.controls(cands)


def _unique_names(found):
    """Checks and stored rows are keyed by name: a second candidate with the same name gets a #k suffix."""
    seen: dict[str, int] = {}
    for c in found:
        n = c.transformation.name
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            c.transformation.name = f"{n}#{seen[n]}"
    return found


def negative_controls(model, loss, batch, trace_examples: int = 4, all_families: bool = False) -> list[Transformation]:
    """Transformations that look like the discovered ones but are not symmetries (wrong-sign ReLU
    rescale, a one-class logit shift). ``expected=False``: checks report ``ok`` when they are rejected.
    ``all_families``: also those of the bias transfers, layer scales and offset gains
    (`affine_family_controls`; the identities stage asks for them)."""
    cands, controls = candidates(model, loss, batch, trace_examples)
    return controls + (affine_family_controls(cands) if all_families else [])


def discover(model, loss, batch, *, verify_examples: int = 32, trace_examples: int = 4, probes: int = 1,
             seed: int = 0) -> Discovery:
    """Transformations found in the graph of ``loss(model(inputs), targets)``, each verified in float64 on
    (the first ``verify_examples`` of) the batch: a finite group element (order 0) and the first- and
    second-order identities; those that hold are checked again with the floating inputs ×3, and each gets a
    three-way verdict (analyses.discover.verdicts). ``model`` is not modified (BN running statistics are
    restored)."""
    with explain.collecting() as rejected:
        cands, _ = candidates(model, loss, batch, trace_examples)
    m64 = copy.deepcopy(model).double()
    b64 = _double(_subset(batch, verify_examples))
    u = unit_roundoff(torch.float64)
    # Active dropout draws new masks on every forward, so the loss is a different function each time
    # and no identity can be verified; say so instead of an "unidentified" violation.
    dropout = active_dropout(model)
    random_loss = [f"active dropout makes the loss random ({', '.join(dropout)}); verify in eval() mode"] \
        if dropout else []
    ts = [c.transformation for c in cands]
    by_name = _by_transformation(check_all(m64, loss, b64, ts, probes=probes, seed=seed) if ts else [])
    out = []
    for c in cands:
        checks = by_name[c.transformation.name]
        v = classify(checks, c.caveats, u, random_loss)
        res = {ch.order: ch.residual for ch in checks}
        tol = max(checks, key=lambda ch: ch.residual / ch.tolerance if ch.tolerance > 0 else float("inf")).tolerance
        out.append(Found(c.transformation, v.verdict == EXACT, max(res.values()), res, list(c.caveats), v.reason,
                         v.verdict, tol, v.cause))
    _check_scaled_inputs(m64, loss, b64, out, probes, seed)
    unique = list({(r.site, r.family, r.reason): r for r in rejected}.values())  # finders may meet a site twice
    return Discovery(out, unique)


def _by_transformation(checks) -> dict:
    out: dict[str, list] = {}
    for ch in checks:
        out.setdefault(ch.transformation, []).append(ch)
    return out


def _check_scaled_inputs(m64, loss, b64, found, probes, seed):
    """A symmetry of the model holds for every input: check the exact ones again on inputs ×3 (a bounded
    activation the batch never reaches, a cancellation of this batch), demoting those whose loss (order 0, at
    a finite group element) changes by more than its rounding level there."""
    b3 = scaled_inputs(b64)
    exact = [f for f in found if f.verified]
    if b3 is None or not exact:
        return
    # the loss at a finite group element (order 0) is what "leaves the loss unchanged" means; one forward each
    by_name = finite_checks(m64, loss, b3, [f.transformation for f in exact], seed=seed)
    for f in exact:
        w = by_name[f.transformation.name]
        f.residual_x3 = w.residual
        if not w.holds:
            f.verified, f.verdict, f.cause = False, BROKEN, "inputs_x3"
            f.reason = (f"holds on the batch but not with its inputs x{INPUT_SCALE:g}: residual {f.residual_x3:.2e} "
                        f"> rounding level {w.tolerance:.1e} at order {w.order}; not a symmetry of the model")
