"""Curvature anisotropy across blocks and along symmetry orbits (catalog rows 2c, 5a/5b, 6b, 6d, 7a; §6 (d)).

Orbit congruence. A verified rescaling family (ReLU / LN-gain unit rescale, BatchNorm / LN scale, Q/K and
V/O GL per head) contains, for every unit group or head, the diagonal move T_c that multiplies each of its
blocks B by a power of c: θ_B → c^{e_B}θ_B (e = +1 for w_in, Q, V or a BN filter; −1 for w_out, K, O).
T_c is linear with L(T_cθ) = L(θ), so H(T_cθ) = T_c⁻ᵀH(θ)T_c⁻¹ and each block's own Hessian is congruent:

    H_BB(T_cθ) = c^{−2e_B} H_BB(θ),   so   λ_max(H_BB) → c^{−2e_B} λ_max(H_BB)   exactly, at every θ.

Measured matrix-free: Lanczos on the block operator x ↦ P_B H P_Bᵀx (one HVP of the model per product) gives
the block's top pair (λ, y) at θ; then one product at θ and one at T_cθ along the same unit y give the two
Rayleigh quotients ρ = yᵀH_BBy and ρ' = yᵀH_BB(T_cθ)y. The statistic is ρ'/ρ, predicted c^{−2e}: under the
symmetry H_BB(T_cθ)y = c^{−2e}H_BB y, so the two differ by the rounding of two HVPs only, whatever Lanczos's
convergence (the λ_max error bounds cancel: the same vector is measured on both sides). The second product
is the first step of a Lanczos run at T_cθ warm-started from y, continued (to ``after_iter`` products) only
if y is not an eigenvector there, so the same run also reports λ_max after the move. Moves: c = 2 (exact in
binary floating point) and the balancing c, c⁴ = ‖θ_out‖²/‖θ_in‖² (‖θ_B‖ = 1 for one-sided families).
Negative control: the same c = 2 applied to one side only (w_in but not w_out, Q but not K; for a one-sided
family, to the first half of the block's coordinates) is not a symmetry and must miss c^{−2e} by a generic,
O(1) amount (a GELU unit's "rescale" is the other control, in the tests).

Block sharpness and imbalance. Per unit group or head the orbit coordinate is the norm ratio
‖θ_out‖²/‖θ_in‖² (‖W_K‖²/‖W_Q‖²): with the orbit-invariant product ‖θ_in‖²‖θ_out‖² it fixes where on the
orbit the block sits, and with it the conserved imbalance ‖θ_in‖² − ‖θ_out‖² (tr D_h = ‖W_Q‖² − ‖W_K‖² per
head, C_i summed over a unit group). Along an orbit, log(λ_in/λ_out) against log(‖θ_out‖²/‖θ_in‖²) has slope
exactly 1 (−1 for log λ against log ‖θ_B‖² of a one-sided, normalised block): that is the congruence
again, measured as a slope between θ and T_2θ (control: the one-sided move). Across the groups or heads of a
layer at one checkpoint the same slope is an empirical question — does the imbalance explain block
heterogeneity (Zhang 2024)? — fitted by least squares with its standard error and a 95% t-interval, and
compared with the orbit's slope (control: the same fit against the norm ratios of the groups taken in a
shifted order, which breaks the pairing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.identities import PASSES, rounding_model
from eqlab.analyses.transforms import Continuous, GLFamily, ScaleFamily, SubGLFamily

F64 = torch.float64
# side names of each block exponent, by family (e = +1: multiplied by c, −1: by 1/c)
SIDES = {"qk_gl": {1: "Q", -1: "K"}, "vo_gl": {1: "V", -1: "O"}}
GROUP_NOUN = {"relu_rescale": "units", "bn_scale": "channels", "ln_gain_rescale": "features",
              "ln_residual_scale": "stream", "rms_residual_scale": "stream", "qk_norm_head_scale": "heads"}
CI = 0.95  # the across-block slope's two-sided t-interval


# ------------------------------------------------------------------------------------------- orbits
@dataclass
class OrbitBlock:
    """One block a move acts on: θ_B → c^exponent·θ_B. ``masks``: parameter → bool mask of its coordinates."""
    name: str
    side: str
    exponent: int
    masks: dict


@dataclass
class OrbitGroup:
    """A unit group or head of one family: the blocks its orbit move scales (one per exponent)."""
    transformation: str
    family: str
    label: str
    blocks: list

    @property
    def two_sided(self) -> bool:
        return any(b.exponent > 0 for b in self.blocks) and any(b.exponent < 0 for b in self.blocks)


def _axis_mask(shape, dim, index) -> Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    if dim is None:
        m[...] = True
        return m
    sel = [slice(None)] * len(shape)
    sel[dim] = torch.as_tensor(index if index is not None else range(shape[dim]))
    m[tuple(sel)] = True
    return m


def _side(family: str, exponent: int, one_sided: bool) -> str:
    if family in SIDES and exponent in SIDES[family]:
        return SIDES[family][exponent]
    if one_sided and exponent == 1:
        return "filter" if family == "bn_scale" else "block"
    return {1: "in", -1: "out"}.get(exponent, f"c^{exponent}")


def _blocks_of(t, label: str, exps: dict) -> list[OrbitBlock]:
    """exps: param → integer exponent tensor (0 = not moved); one OrbitBlock per nonzero exponent."""
    values = sorted({int(v) for e in exps.values() for v in e.unique().tolist() if v != 0}, reverse=True)
    one_sided = all(v > 0 for v in values) or all(v < 0 for v in values)
    out = []
    for v in values:
        masks = {p: e == v for p, e in exps.items() if bool((e == v).any())}
        side = _side(t.family, v, one_sided)
        out.append(OrbitBlock(f"{t.name}[{label}]:{side}", side, v, masks))
    return out


def eligible(t) -> bool:
    """Diagonal rescaling families of an invariance: ScaleFamily without an output scale or loss rate
    (homogeneity is an equivariance), GL / sub-GL blocks (c·I is in every such pair's orbit)."""
    if isinstance(t, ScaleFamily):
        return not any(t.output_scale or []) and not any(t.loss_rate or [])
    return isinstance(t, (GLFamily, SubGLFamily))


def orbit_groups(t: Continuous, shapes: dict, unit_groups: int) -> list[OrbitGroup]:
    """The groups of ``t`` a move can act on: heads for GL families; for scale families the generators
    (units, channels, features) split into ``unit_groups`` contiguous groups."""
    if isinstance(t, (GLFamily, SubGLFamily)):
        groups = []
        for h, b in enumerate(t.blocks):
            exps = {}
            for p, d, i, m in b:
                e = exps.setdefault(p, torch.zeros(shapes[p], dtype=torch.int64))
                e[_axis_mask(shapes[p], d, i)] = 1 if m == "M" else -1
            groups.append(OrbitGroup(t.name, t.family, f"head {h}", _blocks_of(t, f"head {h}", exps)))
        return groups
    K = t.n_generators
    noun = GROUP_NOUN.get(t.family, "generators")
    groups = []
    for part in np.array_split(np.arange(K), min(unit_groups, K)):
        c = torch.zeros(K, dtype=F64)
        c[torch.as_tensor(part)] = 1.0
        D = t.field({p: torch.zeros(shapes[p], dtype=F64) for p in t.params}, c)
        if any(bool((x != x.round()).any()) for x in D.values()):
            return []  # a non-integer exponent field: not a rescaling by powers of one c
        label = f"{noun} {part[0]}" if len(part) == 1 else f"{noun} {part[0]}-{part[-1]}"
        blocks = _blocks_of(t, label, {p: x.round().to(torch.int64) for p, x in D.items()})
        if blocks:
            groups.append(OrbitGroup(t.name, t.family, label, blocks))
    return groups


# ------------------------------------------------------------------------------------ block operator
class BlockOperators:
    """One HessianOperator over every parameter the families touch; block products x ↦ P_B H P_Bᵀx by
    embedding x in the operator's space. Moves write the operator's private copy in place (its cached graphs
    are rebuilt on a changed parameter, operator.py) and `restore` puts θ back bitwise."""

    def __init__(self, model, loss, batch, names: list[str]):
        self.op = HessianOperator(model, loss, batch, names=names, dtype=F64)
        self.space = self.op.space
        self._live = dict(self.op.model.named_parameters())
        self.theta = {n: self._live[n].detach().clone() for n in self.space.names}
        self.hvps = 0

    def index(self, masks: dict) -> Tensor:
        full = {n: masks[n] if n in masks else torch.zeros(self.space.shapes[n], dtype=torch.bool)
                for n in self.space.names}
        return torch.nonzero(self.space.flatten(full)).reshape(-1)

    def norm2(self, masks: dict) -> float:
        """‖θ_B‖² at the current point."""
        return float(sum((self._live[p].detach()[m].double() ** 2).sum() for p, m in masks.items()))

    def matvec(self, idx: Tensor):
        def mv(x: Tensor) -> Tensor:
            v = torch.zeros(self.space.dim, dtype=F64)
            v[idx] = x.to(F64)
            self.hvps += 1
            return self.op.matvec(v)[idx]
        return mv

    def move(self, factors: dict):
        """θ_p ← factors[p] ⊙ θ_p (from θ, not cumulative)."""
        with torch.no_grad():
            for n, f in factors.items():
                self._live[n].copy_(self.theta[n] * f)

    def restore(self):
        with torch.no_grad():
            for n in self.space.names:
                self._live[n].copy_(self.theta[n])


@dataclass
class BlockTop:
    """A block's top Lanczos pair at θ and its Rayleigh quotient ρ = yᵀH_BB y by one more product."""
    lam: float
    vec: Tensor
    residual: float
    error: float          # |λ − λ_max| bound: min(r, r²/gap) when certified, else the residual
    converged: bool
    scale: float          # max |Ritz value|: the block's curvature scale
    rho: float
    hvps: int
    norm2: float          # ‖θ_B‖²


@dataclass
class Transported:
    """ρ' = yᵀH_BB(Tθ)y (the first step of a Lanczos run at Tθ warm-started from y) and that run's λ_max."""
    rho: float
    lam: float
    residual: float
    hvps: int
    norm2: float


def _top(ops: BlockOperators, blk: OrbitBlock, tol, max_iter, seed) -> BlockTop:
    idx = ops.index(blk.masks)
    mv = ops.matvec(idx)
    n0 = ops.hvps
    res = lanczos(mv, len(idx), k=1, which="LA", tol=tol, max_iter=min(max_iter, len(idx)), seed=seed, warn=False)
    Y = res.eigenvectors if res.eigenvectors.shape[0] == len(idx) else res.eigenvectors.T
    y = Y[:, 0].to(F64)
    y = y / y.norm()
    rho = float(y @ mv(y))  # the same one-product measurement the moved point gets
    err = float(res.errors[0]) if res.converged[0] else float(res.residuals[0])
    return BlockTop(float(res.eigenvalues[0]), y, float(res.residuals[0]), err, bool(res.converged[0]),
                    float(res.scale), rho, ops.hvps - n0, ops.norm2(blk.masks))


def _transported(ops: BlockOperators, blk: OrbitBlock, top: BlockTop, tol, after_iter) -> Transported:
    idx = ops.index(blk.masks)
    n0 = ops.hvps
    res = lanczos(ops.matvec(idx), len(idx), k=1, which="LA", tol=tol, max_iter=min(after_iter, len(idx)),
                  v0=top.vec, verify=False, warn=False)
    return Transported(float(res.alphas[0]), float(res.eigenvalues[0]), float(res.residuals[0]),
                       ops.hvps - n0, ops.norm2(blk.masks))


# --------------------------------------------------------------------------------------- the findings
@dataclass
class CongruenceRow:
    """One block after one move: ρ'/ρ against c^{−2e}."""
    block: str
    transformation: str
    family: str
    group: str
    move: str             # "c=2", "balanced c=…", "one side c=2"
    control: bool
    c: float
    exponent: int         # the block's own power of c in the move (0: a control block the move leaves alone)
    statistic: float      # ρ'/ρ
    predicted: float      # c^{−2e} of the symmetry move
    tolerance: float
    lam: float            # λ_max before (Lanczos)
    lam_residual: float
    lam_after: float      # λ_max after (Lanczos warm-started from y)
    lam_after_residual: float
    hvps: int
    reason: str
    verdict: str = ""

    @property
    def residual(self) -> float:
        return abs(self.statistic - self.predicted)


@dataclass
class SlopeRow:
    """A log–log slope of block sharpness against the orbit coordinate: along one orbit move (exact) or
    across the groups/heads of one family at one checkpoint (empirical)."""
    name: str
    transformation: str
    family: str
    control: bool
    kind: str             # "orbit" | "across"
    statistic: float      # the slope
    std: float            # its standard error (orbit: 0, a two-point slope)
    predicted: float
    tolerance: float
    n: int                # points in the fit
    reason: str
    verdict: str = ""
    points: list = field(default_factory=list)  # (x, y) per group, for plots and tests

    @property
    def residual(self) -> float:
        return abs(self.statistic - self.predicted)


@dataclass
class BlockSharpness:
    """A block's λ_max at θ (the blocks × checkpoints heatmap), with its weight norm."""
    block: str
    transformation: str
    family: str
    lam: float
    residual: float
    converged: bool
    norm2: float
    hvps: int


@dataclass
class BlockFindings:
    sharpness: list
    congruence: list
    slopes: list
    hvps: int
    dtype: str = "float64"
    masks: dict = field(default_factory=dict)  # with keep: block name → {param: bool mask}


def _exact_verdict(control: bool, residual: float, tolerance: float) -> str:
    ok = residual <= tolerance
    if control:
        return "inconclusive" if ok else "violated"
    return "holds" if ok else "violated"


def _rho_bound(gam: float, top: BlockTop, rho: float) -> float:
    """Rounding of one Rayleigh quotient by an HVP: 4·γ_n(u)·(‖H_BB y‖ + κ) with ‖H_BB y‖ ≤ |ρ| + r and κ the
    block's curvature scale (max |Ritz value|), the flat-direction rounding model contracted with a unit y."""
    return PASSES[2] * gam * (abs(rho) + top.residual + top.scale)


def _congruence(ops, g, tops, move, control, c, tol, after_iter, gam, predicted_of) -> list:
    """Apply one move to group ``g`` and measure every block of it along its transported top eigenvector."""
    rows = []
    for blk in g.blocks:
        top = tops[blk.name]
        if not top.rho > 0 or not top.lam > 0:
            continue  # a block with no positive curvature (a dead unit): no ratio to compare
        tr = _transported(ops, blk, top, tol, after_iter)
        pred = predicted_of(blk)
        stat = tr.rho / top.rho
        # ρ' and ρ each carry one HVP's rounding; under the symmetry ρ' = pred·ρ, so the ratio's error is
        # pred·(δρ + δρ'/pred)/ρ with δρ' ≤ the same bound at the scaled block (pred·scale)
        tol_r = pred * 2 * _rho_bound(gam, top, top.rho) / top.rho
        reason = (f"Rayleigh quotients of the block's top Lanczos vector y at theta and after the move "
                  f"({move}), one HVP each: 2 x 4 gamma_n(u) x (|rho| + r + kappa)/rho x predicted, gamma_n = "
                  f"{gam:.2e}, r = {top.residual:.2e}, kappa = {top.scale:.3g} (the lambda_max error bounds "
                  f"cancel: the same vector is measured on both sides); lambda_max {top.lam:.6g} -> "
                  f"{tr.lam:.6g} (Lanczos warm-started from y, {tr.hvps} products, residual {tr.residual:.1e})")
        row = CongruenceRow(blk.name, g.transformation, g.family, g.label, move, control, c, blk.exponent, stat,
                            pred, tol_r, top.lam, top.residual, tr.lam, tr.residual, tr.hvps, reason)
        row.verdict = _exact_verdict(control, row.residual, row.tolerance)
        row.norm2_after = tr.norm2
        row.rho_after = tr.rho
        rows.append(row)
    return rows


def _factors(ops, g: OrbitGroup, c_of, only=None) -> dict:
    """Per parameter the factor field of the move: c_of(block)^exponent on each block's coordinates."""
    out = {}
    for blk in g.blocks:
        if only is not None and not only(blk):
            continue
        for p, m in blk.masks.items():
            f = out.setdefault(p, torch.ones(ops.space.shapes[p], dtype=F64))
            f[m] = f[m] * (c_of(blk) ** blk.exponent)
    return out


def _half_mask(masks: dict) -> dict:
    """The first half (flat order over the block's parameters) of a block's coordinates: a partial rescale."""
    total = sum(int(m.sum()) for m in masks.values())
    left, out = (total + 1) // 2, {}
    for p, m in masks.items():
        flat = m.reshape(-1).clone()
        pos = torch.nonzero(flat).reshape(-1)
        keep, left = pos[:left], max(0, left - len(pos))
        h = torch.zeros_like(flat)
        h[keep] = True
        out[p] = h.reshape(m.shape)
    return out


def _orbit_slope(g: OrbitGroup, rows: list, tops: dict, ops_norm0: dict, control: bool) -> SlopeRow | None:
    """The slope between θ and the moved point: Δlog(λ_in/λ_out)/Δlog(‖θ_out‖²/‖θ_in‖²) for a two-sided group
    (predicted 1), Δlog λ/Δlog ‖θ_B‖² for a one-sided block (predicted −1), from the measured ρ, ρ'."""
    by = {r.block: r for r in rows}
    if g.two_sided:
        ups = [b for b in g.blocks if b.exponent > 0]
        downs = [b for b in g.blocks if b.exponent < 0]
        if len(ups) != 1 or len(downs) != 1 or ups[0].name not in by or downs[0].name not in by:
            return None
        u, d = by[ups[0].name], by[downs[0].name]
        if not (u.statistic > 0 and d.statistic > 0):
            return None  # a sign change of the curvature (a control can do that): no log slope
        num = math.log(u.statistic) - math.log(d.statistic)
        den = (math.log(d.norm2_after / ops_norm0[d.block]) - math.log(u.norm2_after / ops_norm0[u.block]))
        pred, name = 1.0, f"{g.transformation}[{g.label}]"
        rel = u.tolerance / u.predicted + d.tolerance / d.predicted
    else:
        if len(g.blocks) != 1 or g.blocks[0].name not in by:
            return None
        u = by[g.blocks[0].name]
        if not u.statistic > 0:
            return None
        num = math.log(u.statistic)
        den = math.log(u.norm2_after / ops_norm0[u.block])
        pred, name = -1.0, f"{g.transformation}[{g.label}]"
        rel = u.tolerance / u.predicted
    if den == 0:
        return None
    slope = num / den
    # |Δ log ρ-ratio| errors are the ratios' relative rounding bounds (log(1+x) ≤ x), over the exact |Δ log norm|
    tol_s = rel / abs(den)
    move = u.move
    reason = (f"along the orbit ({move}): slope of log sharpness ratio against log norm ratio between theta and "
              f"the moved point, exact (the congruence); tolerance = the two Rayleigh-quotient ratios' rounding "
              f"bounds / |Delta log norm ratio| = {abs(den):.3g}")
    row = SlopeRow(name, g.transformation, g.family, control, "orbit", slope, 0.0, pred, tol_s, 2, reason)
    row.verdict = _exact_verdict(control, row.residual, row.tolerance)
    return row


def ols_slope(x, y) -> tuple[float, float, int]:
    """Least-squares slope of y on x with its standard error (nan for fewer than 3 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    sxx = float(((x - x.mean()) ** 2).sum())
    if n < 2 or sxx == 0:
        return math.nan, math.nan, n
    b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    if n < 3:
        return b, math.nan, n
    resid = y - y.mean() - b * (x - x.mean())
    return b, math.sqrt(float(resid @ resid) / (n - 2) / sxx), n


def across_verdict(slope: float, se: float, n: int, predicted: float, control: bool) -> tuple[str, float, str]:
    """(verdict, CI half-width, why) of an empirical slope: violated if the 95% t-interval excludes the orbit's
    slope; holds if it contains it and excludes 0 (no relation); inconclusive if it contains both, or with
    fewer than 3 points (no standard error). A control (shuffled pairing) that 'holds' is inconclusive."""
    from scipy.stats import t as student_t
    if not (math.isfinite(slope) and math.isfinite(se)):
        return "inconclusive", math.nan, f"{n} points: no standard error (needs >= 3 blocks)"
    half = float(student_t.ppf(0.5 + CI / 2, n - 2)) * se
    if abs(slope - predicted) > half:
        v, why = "violated", f"the {CI:.0%} interval {slope:.3g} +- {half:.3g} excludes {predicted:g}"
    elif abs(slope) <= half:
        v, why = "inconclusive", (f"the {CI:.0%} interval {slope:.3g} +- {half:.3g} contains both {predicted:g} "
                                  f"and 0: {n} blocks cannot tell the orbit's slope from no relation")
    else:
        v, why = "holds", f"the {CI:.0%} interval {slope:.3g} +- {half:.3g} contains {predicted:g}, not 0"
    if control and v == "holds":
        v = "inconclusive"
    return v, half, why


def control_of_fit(fit: str, control: str, why: str) -> tuple[str, str]:
    """A shuffled-pairing control discriminates only a fit that can tell: next to an inconclusive fit, a
    control that misses the slope shows nothing, so it is inconclusive too."""
    if fit == "inconclusive" and control == "violated":
        return "inconclusive", why + "; but the fit itself is inconclusive, so this control shows nothing"
    return control, why


def _across(t_name: str, family: str, groups: list, tops: dict) -> list[SlopeRow]:
    """Across the groups/heads of one family: log sharpness ratio against log norm ratio (two-sided, slope 1)
    or log λ_max against log ‖θ_B‖² (one-sided, slope −1); plus the shuffled-pairing control."""
    pts = []
    for g in groups:
        if g.two_sided:
            ups = [b for b in g.blocks if b.exponent > 0]
            downs = [b for b in g.blocks if b.exponent < 0]
            if len(ups) != 1 or len(downs) != 1:
                continue
            u, d = tops[ups[0].name], tops[downs[0].name]
            if u.lam > 0 and d.lam > 0 and u.norm2 > 0 and d.norm2 > 0:
                pts.append((math.log(d.norm2 / u.norm2), math.log(u.lam / d.lam)))
            pred = 1.0
            what = "log(lambda_in/lambda_out) on log(||theta_out||^2/||theta_in||^2)"
        else:
            if len(g.blocks) != 1:
                continue
            u = tops[g.blocks[0].name]
            if u.lam > 0 and u.norm2 > 0:
                pts.append((math.log(u.norm2), math.log(u.lam)))
            pred = -1.0
            what = "log lambda_max on log ||theta_B||^2"
    if len(pts) < 2:
        return []  # one block: no slope at all (two give a slope without a standard error: inconclusive)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    rows = []
    for control, x in ((False, xs), (True, xs[1:] + xs[:1])):  # the control pairs each y with the next group's x
        slope, se, n = ols_slope(x, ys)
        verdict, half, why = across_verdict(slope, se, n, pred, control)
        if control:
            verdict, why = control_of_fit(rows[0].verdict, verdict, why)
        reason = (f"across the {n} groups/heads of {t_name} at this checkpoint: least-squares slope of {what}; "
                  f"empirical hypothesis, not an exact consequence of the symmetry (along one orbit the slope is "
                  f"exactly {pred:g}): {why}" + (" (control: each group's x paired with the next group's)"
                                                 if control else ""))
        row = SlopeRow(f"{t_name}[across]", t_name, family, control, "across", slope, se, pred, half, n, reason,
                       points=list(zip(x, ys)))
        row.verdict = verdict
        rows.append(row)
    return rows


def block_findings(model, loss, batch, transformations, unit_groups: int = 3, tol: float = 1e-2,
                   max_iter: int = 20, after_iter: int = 2, move_groups: int | None = 1, families=None,
                   seed: int = 0, keep: bool = False) -> BlockFindings:
    """Every eligible verified family (of ``families``, default all): per group/head block λ_max at θ (Lanczos
    to residual ``tol``·λ, certified by a verification block, at most ``max_iter`` products), the congruence
    along c = 2 and the balancing c with the one-sided control on ``move_groups`` groups (None: all), the orbit
    slopes, and the across-group slopes (module doc). ``after_iter``: products of the warm-started Lanczos
    after a move (1 when the congruence holds). ``keep``: each congruence row also keeps the move's factor
    fields and the transported vector y (``row.factors``, ``row.vec``), for dense oracles in tests."""
    families = [t for t in transformations if isinstance(t, Continuous) and eligible(t)
                and (families is None or t.family in families)]
    if not families:
        return BlockFindings([], [], [], 0)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    names = list(dict.fromkeys(p for t in families for p in t.params))
    ops = BlockOperators(model, loss, batch, names)
    gam = rounding_model(model, loss, batch, seed).gamma()
    sharp, cong, slopes, masks = [], [], [], {}
    for t in families:
        groups = orbit_groups(t, shapes, unit_groups)
        if not groups:
            continue
        tops = {}
        for g in groups:
            for blk in g.blocks:
                tops[blk.name] = top = _top(ops, blk, tol, max_iter, seed)
                if keep:
                    masks[blk.name] = blk.masks
                sharp.append(BlockSharpness(blk.name, t.name, t.family, top.lam, top.residual, top.converged,
                                            top.norm2, top.hvps))
        norm0 = {b: tops[b].norm2 for b in tops}
        balanced = {}
        for g in groups:
            if g.two_sided:
                up = sum(tops[b.name].norm2 for b in g.blocks if b.exponent > 0)
                down = sum(tops[b.name].norm2 for b in g.blocks if b.exponent < 0)
                balanced[g.label] = (down / up) ** 0.25 if up > 0 and down > 0 else None
            else:
                n2 = sum(tops[b.name].norm2 for b in g.blocks)
                balanced[g.label] = (1.0 / math.sqrt(n2)) ** (1.0 / g.blocks[0].exponent) if n2 > 0 else None
        moves = [("c=2", False, lambda g: 2.0, None), ("balanced", False, lambda g: balanced[g.label], None),
                 ("one side c=2", True, lambda g: 2.0, "control")]
        # the moves on the first move_groups groups whose blocks all have positive curvature (the law is
        # the same for every group; the other groups still give the heatmap and the across-group fit)
        movable = [g for g in groups if all(tops[b.name].lam > 0 and tops[b.name].rho > 0 for b in g.blocks)]
        for move, control, c_of, kind in moves:
            for g in movable[:move_groups]:  # one group at a time: moving several at once can be a symmetry
                c = c_of(g)   # (every ReLU channel's input side at once is a BatchNorm scale downstream)
                if c is None:
                    continue
                if kind is None:
                    factors = _factors(ops, g, lambda b, c=c: c)
                elif g.two_sided:
                    factors = _factors(ops, g, lambda b, c=c: c, only=lambda b: b.exponent > 0)
                else:
                    half = OrbitGroup(g.transformation, g.family, g.label,
                                      [OrbitBlock(b.name, b.side, b.exponent, _half_mask(b.masks)) for b in g.blocks])
                    factors = _factors(ops, half, lambda b, c=c: c)
                ops.move(factors)
                label = move if move != "balanced" else f"balanced c={c:.4g}"
                rows = _congruence(ops, g, tops, label, control, c, tol, after_iter, gam,
                                   lambda b, c=c: c ** (-2 * b.exponent))
                ops.restore()
                for r_ in rows if keep else ():
                    r_.factors, r_.vec = factors, tops[r_.block].vec
                cong += rows
                if move != "balanced":
                    s = _orbit_slope(g, rows, tops, norm0, control)
                    if s is not None:
                        slopes.append(s)
        slopes += _across(t.name, t.family, groups, tops)
    return BlockFindings(sharp, cong, slopes, ops.hvps, masks=masks)
