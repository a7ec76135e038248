"""Numerical checks of the symmetry / equivariance identities (theory.md §1.2-1.4) at one θ and batch.

Orders and residuals (all dimensionless, ≈ 0 when the identity holds, O(1) for a generic non-symmetry):

* order 0 (finite group element T = e^{sξ_c}, or a discrete T):
  r0 = |L(Tθ) - a·L(θ)| / max(|L(Tθ)|, |a·L(θ)|); when the transformation is model-level equivariant
  (f(Tθ) = S f(θ)) the outputs themselves are compared, r0 = ‖f(Tθ) - S f(θ)‖ / max(‖·‖, ‖·‖).
* order 1, continuous (I1): r1 = |⟨g, ξ⟩ - Ψ| / (‖g‖·‖ξ‖ + |Ψ|), with the full gradient g (all
  parameters). Cauchy-Schwarz bounds |⟨g, ξ⟩| by the first term, so r1 is a cosine-like violation; the full
  g (not g restricted to the family's parameters P) keeps it 0, not 0/0, when g_P vanishes identically
  (a bias feeding a BatchNorm).
  Discrete (D1): r1 = rel(g(Tθ), a·T^{-T} g(θ)), rel(x, y) = ‖x - y‖/max(‖x‖, ‖y‖) (theory §5 convention).
* order 2, continuous (I2): with lhs = Hξ + J_ξᵀg and rhs = ∇Ψ,
  r2 = ‖lhs - rhs‖ / (‖Hξ‖ + ‖J_ξᵀg‖ + ‖∇Ψ‖ + κ‖ξ‖),  κ = ‖H u‖ for a random unit vector u over all
  parameters (an rms curvature, ≈ ‖H‖_F/√d). The κ‖ξ‖ term is what a *typical* direction of the same size
  would give, so a translation (Hv = 0 and J = 0: both sides vanish) is measured against the model's
  curvature scale instead of against 0/0; u is not restricted to P because P may be entirely flat. J_ξᵀg is a VJP of ξ, so θ-dependent (non-linear) generators need nothing special.
  Discrete (D2): r2 = rel(H(Tθ)·T_lin v, a·T^{-T} H(θ) v) for random v on P.

Every HVP is the exact double-backward one from `analyses.curvature.functional`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from eqlab.analyses.curvature.functional import (dot, forward, loss_function, named_params, norm, value_and_grad,
                                           value_grad_hvp)
from eqlab.analyses.transforms import Continuous, Discrete, GroupElement, Transformation
from eqlab.models.losses import logits_of


def output_tensor(out):
    """The model output f of the equivariance relation: logits, else a headless model's final hidden
    state, else the plain tensor."""
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out

# ------------------------------------------------------------------ the rounding model behind every verdict
# A residual r = |x − y| / scale compares two computed quantities that are equal in exact arithmetic when
# the identity holds. Its tolerance is a worst-case bound on what rounding alone can make of r:
#
#   tol = p_k · γ_n(u) · R,    γ_n(u) = n u / (1 − n u)   (Higham, Accuracy and Stability, §3.1)
#
# * u: the unit roundoff ε/2 of the parameters' dtype. Where the forward computes θ-dependent tensors in a
#   coarser dtype (HF ViT/Llama take the softmax and RMSNorm in float32 inside a float64 model; `_probe`
#   counts those calls), each such op adds γ_{m+1}(u_low) to the pass, m = the longest last dimension it
#   reads (the reduction of a softmax / mean; elementwise ops are within it).
# * γ_n bounds the relative error of an n-term sum or dot product in ANY order, blocking or thread split,
#   so the verdict does not depend on the CPU, BLAS kernel or thread count. n is the longest chain of
#   accumulations one entry goes through: each layer's fan-in / fan-out ≤ its parameter count (Σ ≤ d), one
#   reduction over the batch positions (≤ the input entries), the loss over the outputs (≤ their entries) and
#   the final inner product / norm over the parameters (≤ d): n = 2d + numel(inputs) + numel(outputs).
# * p_k: passes whose errors add up at order k: 1 (forward) at order 0, 2 (+ backward) at order 1,
#   4 (+ the two passes of the double backward) at order 2.
# * R = (magnitudes of the terms that were summed) / scale: the error bound is relative to the terms'
#   magnitudes, the residual to its scale. Every scale below already contains the terms (Cauchy-Schwarz:
#   |⟨g, ξ⟩| ≤ Σ|g_i ξ_i| ≤ ‖g‖‖ξ‖), so R is 1 for the continuous orders 1/2, ≤ 2 for rel(a, b), and at
#   order 0 it adds M_f = Σ|∂L/∂f|·|f| (what a relative rounding of every output entry does to L: a
#   cross-entropy near 0 from logits of 10 cancels, and M_f/|L| says by how much).
# The bound takes a computed term's norm as the magnitude of its own sum (no cancellation inside the
# backward pass); worst-case γ_n over-estimates typical (√n) rounding by ~√n, which is the margin for that.
# Observed float64 exact identities sit at 1e-17-1e-15, 3-5 orders under these tolerances; a norm-layer
# eps is a real violation (~eps/Var) and is reported as one once it exceeds them.
PASSES = {0: 1, 1: 2, 2: 4}
PASS_NAMES = {0: "forward", 1: "forward + backward", 2: "forward + backward + double backward"}
NEGATIVE_CONTROL_MIN = 1e-2  # not a rounding bound: the effect size a control must show somewhere (rejected())
_TINY = 1e-300               # division guard only (0/0 -> 0), never a tolerance


def unit_roundoff(dtype) -> float:
    """u = ε/2: 1.1e-16 (float64), 6.0e-8 (float32), 4.9e-4 (float16), 3.9e-3 (bfloat16)."""
    return float(torch.finfo(dtype).eps) / 2


def gamma(n: int, u: float) -> float:
    """Higham's γ_n = nu/(1 − nu): worst-case relative error of an n-term sum in any order; inf once nu ≥ 1."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def chain_length(model, batch) -> int:
    """n = 2d + numel(inputs) + numel(outputs) of the rounding model above (one forward)."""
    inputs = batch[0]
    with torch.no_grad():
        out = forward(model, named_params(model), inputs)
    d = sum(p.numel() for p in model.parameters())
    return 2 * d + sum(t.numel() for t in _tensors(inputs)) + sum(t.numel() for t in _tensors(out)
                                                                 if t.is_floating_point())


def rounding_bound(n: int, dtype=torch.float64, passes: int = 1) -> float:
    """passes · γ_n(u): the relative rounding a chain of ``passes`` passes of n-term sums can leave."""
    return passes * gamma(n, unit_roundoff(dtype))


def tolerance_for(dtype, order: int = 2, n: int = 1, ratio: float = 1.0, u: float | None = None) -> float:
    """The rounding tolerance p_order · γ_n(u) · ratio of a residual at ``order`` (see the model above);
    u defaults to the dtype's unit roundoff."""
    return PASSES[order] * gamma(n, unit_roundoff(dtype) if u is None else u) * ratio


@dataclass
class IdentityCheck:
    transformation: str
    family: str
    kind: str            # "continuous" | "discrete"
    order: int           # 0: finite element (loss / outputs), 1: gradient identity, 2: Hessian identity
    residual: float      # max over probes
    tolerance: float
    holds: bool          # residual <= tolerance
    expected: bool       # False for a negative control (then it must NOT hold)
    ok: bool             # holds if expected, else not holds (a negative control is rejected)
    n_hvp: int
    probes: int
    lhs: float           # norms of the two sides at the worst probe (|.| at order 0/1 continuous)
    rhs: float
    scale: float         # the residual's denominator at the worst probe
    dtype: str
    params: list = field(default_factory=list)
    # "holds" | "violated" (expected identities), "rejected" | "not_discriminating" (negative controls:
    # a control whose residual is within the rounding tolerance cannot be told from a symmetry here)
    verdict: str = ""
    tolerance_reason: str = ""   # why this tolerance: the rounding argument with its numbers

    def as_row(self) -> dict:
        row = asdict(self)
        row["params"] = ",".join(self.params)
        return {k: (float(v) if isinstance(v, float) else v) for k, v in row.items()}


def _full(v: dict, like: dict) -> dict:
    return {n: v[n] if n in v else torch.zeros_like(p) for n, p in like.items()}


def _sub(d: dict, names) -> dict:
    return {n: d[n] for n in names}


def _f(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _rel(a: dict, b: dict) -> tuple[float, float, float]:
    na, nb = _f(norm(a)), _f(norm(b))
    diff = _f(norm({n: a[n] - b[n] for n in a}))
    return diff / max(na, nb, _TINY), na, nb


class _Context:
    """Loss, gradient and helpers at one (θ, batch), shared by all checks."""

    def __init__(self, model, loss, batch, seed):
        self.model, self.loss, self.batch = model, loss, batch
        self.theta = named_params(model)
        self.L = loss_function(model, loss, batch)
        self.value, self.grad = value_and_grad(self.L, self.theta)
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = next(iter(self.theta.values())).dtype
        self.grad_norm = _f(norm(self.grad))
        self._kappa = None
        self._rounding = None

    def kappa(self) -> float:
        """‖H u‖ for one random unit u over all parameters (shared by every check at this θ)."""
        if self._kappa is None:
            u = self.randn_like(list(self.theta))
            un = _f(norm(u))
            _, _, hu = value_grad_hvp(self.L, self.theta, {n: x / un for n, x in u.items()})
            self._kappa = _f(norm(hu))
        return self._kappa

    def rounding(self) -> "_Rounding":
        """n, u and M_f of the rounding model, from one forward (and a backward to the outputs) at θ."""
        if self._rounding is None:
            self._rounding = _probe(self)
        return self._rounding

    def randn_like(self, names):
        return {n: torch.randn(self.theta[n].shape, generator=self.gen, dtype=torch.float64).to(self.theta[n])
                for n in names}

    def outputs(self, params=None):
        with torch.no_grad():
            out = output_tensor(forward(self.model, params or self.theta, self.batch[0]))
        return out

    def psi_terms(self, params):
        """(E⟨∇_fℓ, f⟩, L) as differentiable functions of params: the two pieces Ψ is built from; and
        Σ|∇_fℓ · f|, the magnitude of the terms of the first (for its rounding bound)."""
        inputs, targets = self.batch
        out = forward(self.model, params, inputs)
        f = output_tensor(out)
        # the loss gets the model's own output object (it may read .logits); f is the very tensor it reads
        value = self.loss(out, targets)
        (gf,) = torch.autograd.grad(value, f, create_graph=True)
        return (gf * f).sum(), value, _f((gf * f).abs().sum())


def rounding_model(model, loss, batch, seed: int = 0) -> "_Rounding":
    """The rounding model's inputs at (θ, batch): n, u, coarser-dtype ops (one forward and backward)."""
    return _Context(model, loss, batch, seed).rounding()


@dataclass
class _Rounding:
    u: float                # unit roundoff of the parameters' dtype
    n: int                  # chain length 2d + numel(inputs) + numel(outputs)
    d: int
    n_in: int
    n_out: int
    loss_mag: float         # M_f = Σ|∂L/∂f|·|f| over the floating outputs
    low: str = ""           # a coarser dtype some θ-dependent tensors of the forward are computed in, if any
    u_low: float = 0.0
    n_low_ops: int = 0      # how many torch calls return such tensors
    m_low: int = 0          # the longest last dimension they read (softmax over keys, RMSNorm's mean over D)

    def gamma(self) -> float:
        """Relative rounding of one pass: γ_n(u), plus γ_{m+1}(u_low) for each coarser op on the chain."""
        return gamma(self.n, self.u) + self.n_low_ops * (gamma(self.m_low + 1, self.u_low) if self.n_low_ops else 0.0)


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict) or hasattr(x, "items"):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


class _DtypeRecorder(TorchFunctionMode):
    """Counts the torch calls that return a θ-dependent (requires_grad) floating tensor in a dtype coarser
    than the parameters' (HF computes softmax and RMSNorm in float32 inside a float64 model)."""

    def __init__(self, u):
        super().__init__()
        self.u, self.low, self.count, self.m = u, None, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        coarse = [t.dtype for t in _tensors(out)
                  if t.is_floating_point() and t.requires_grad and unit_roundoff(t.dtype) > self.u]
        if coarse:
            self.count += 1
            lo = max(coarse, key=unit_roundoff)
            if self.low is None or unit_roundoff(lo) > unit_roundoff(self.low):
                self.low = lo
            ins = [t for t in _tensors((args, kwargs)) if t.dim() > 0]
            self.m = max([self.m] + [int(t.shape[-1]) for t in ins])
        return out


def _probe(ctx) -> _Rounding:
    inputs, targets = ctx.batch
    ps = _leaves(ctx.theta)
    u = unit_roundoff(ctx.dtype)
    rec = _DtypeRecorder(u)
    with torch.enable_grad():
        with rec:
            out = forward(ctx.model, ps, inputs)
        value = ctx.loss(out, targets)
        outs = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
        grads = torch.autograd.grad(value, outs, allow_unused=True) if outs else []
    loss_mag = sum(_f((gr.abs() * t.abs()).sum()) for t, gr in zip(outs, grads) if gr is not None)
    d = sum(p.numel() for p in ctx.theta.values())
    n_in = sum(t.numel() for t in _tensors(inputs))
    n_out = sum(t.numel() for t in outs)
    low = {} if rec.low is None else dict(low=str(rec.low).replace("torch.", ""), u_low=unit_roundoff(rec.low),
                                         n_low_ops=rec.count, m_low=rec.m)
    return _Rounding(u, 2 * d + n_in + n_out, d, n_in, n_out, float(loss_mag), **low)


def _leaves(d):
    return {n: p.detach().requires_grad_(True) for n, p in d.items()}


def _continuous_probe(ctx: _Context, t: Continuous, c: Tensor, kappa: float):
    theta, g = ctx.theta, ctx.grad
    P = t.params
    # ξ and J_ξᵀg: one VJP through the generator's own ops (zero for a translation).
    leaves = _leaves(_sub(theta, P))
    xi = t.xi(leaves, c)
    outs = [n for n in P if xi[n].requires_grad]
    if outs:
        jtg = torch.autograd.grad([xi[n] for n in outs], [leaves[n] for n in P],
                                  grad_outputs=[g[n] for n in outs], allow_unused=True)
        jtg = {n: torch.zeros_like(theta[n]) if j is None else j for n, j in zip(P, jtg)}
    else:
        jtg = {n: torch.zeros_like(theta[n]) for n in P}
    xi = {n: x.detach() for n, x in xi.items()}
    b, a = t.psi_weights(c)
    # Ψ and ∇Ψ: only when the family is equivariant rather than invariant.
    psi, psi_mag, grad_psi, extra_hvp = 0.0, 0.0, {n: torch.zeros_like(p) for n, p in theta.items()}, 0
    if b != 0.0 or a != 0.0:
        ps = _leaves(theta)
        fdotg, value, fdotg_mag = ctx.psi_terms(ps)
        psi_t = b * fdotg + a * value
        gp = torch.autograd.grad(psi_t, list(ps.values()), allow_unused=True)
        grad_psi = {n: torch.zeros_like(p) if x is None else x for (n, p), x in zip(theta.items(), gp)}
        psi, extra_hvp = _f(psi_t), 1
        psi_mag = abs(b) * fdotg_mag + abs(a) * (abs(_f(value)) + ctx.rounding().loss_mag)
    # order 1
    gx = _f(dot(_sub(g, P), xi))
    s1 = ctx.grad_norm * _f(norm(xi)) + abs(psi)
    r1 = abs(gx - psi) / max(s1, _TINY)
    # magnitudes summed: Σ|g_i ξ_i| ≤ ‖g‖‖ξ‖ (Cauchy-Schwarz), and Ψ's terms
    # order 2
    _, _, hxi = value_grad_hvp(ctx.L, theta, _full(xi, theta))
    lhs = {n: hxi[n] + (jtg[n] if n in jtg else 0.0) for n in theta}
    num = _f(norm({n: lhs[n] - grad_psi[n] for n in theta}))
    s2 = (_f(norm(hxi)) + _f(norm(jtg)) + _f(norm(grad_psi)) + kappa * _f(norm(xi)))
    r2 = num / max(s2, _TINY)
    # s2 holds every term's norm, and κ‖ξ‖ stands for ‖|H||ξ|‖ when Hξ cancels to ~0 (a translation)
    m1, m2 = ctx.grad_norm * _f(norm(xi)) + psi_mag, s2
    return (r1, abs(gx), abs(psi), s1, m1), (r2, _f(norm(lhs)), _f(norm(grad_psi)), s2, m2), 1 + extra_hvp


def _finite_residual(ctx: _Context, T: Discrete):
    """(r0, |lhs|, |rhs|, scale, magnitude of the summed terms) of the finite element."""
    moved = dict(ctx.theta)
    moved.update(T.apply(_sub(ctx.theta, T.params)))
    if T.output_scale is not None:  # model-level equivariance: compare the outputs
        fa, fb = ctx.outputs(moved), T.output_scale * ctx.outputs()
        r, na, nb = _rel({"f": fa}, {"f": fb})
        return r, na, nb, max(na, nb), na + nb
    with torch.no_grad():
        la, lb = _f(ctx.L(moved)), T.loss_scale * _f(ctx.value)
    s = max(abs(la), abs(lb))
    # each loss value's error: its own terms (≤ |L|) plus every output entry's relative rounding, M_f
    mag = abs(la) + abs(lb) + (1.0 + abs(T.loss_scale)) * ctx.rounding().loss_mag
    return abs(la - lb) / max(s, _TINY), abs(la), abs(lb), s, mag


def _check(t, order, results, n_hvp, ctx):
    """One stored verdict. results: per probe (residual, lhs, rhs, scale, magnitude of the summed terms);
    the tolerance is the rounding bound p_order·γ_n(u)·(magnitude/scale), the smallest over the probes that
    compared anything (a probe with both sides exactly 0 has residual 0 and no scale)."""
    worst = max(results, key=lambda x: x[0])
    r = float(worst[0])
    rd = ctx.rounding()
    gam = rd.gamma()
    ratios = [float(x[4]) / float(x[3]) for x in results if x[3] > 0]
    ratio = min(ratios) if ratios else 0.0
    tol = PASSES[order] * gam * ratio
    holds = bool(r <= tol)
    ok = holds if t.expected else not holds
    verdict = ("holds" if holds else "violated") if t.expected else ("not_discriminating" if holds else "rejected")
    dtype = str(ctx.dtype).replace("torch.", "")
    low = (f" + {rd.n_low_ops} ops computed in {rd.low} inside the {dtype} model, each gamma_{rd.m_low + 1} "
           f"at u = {rd.u_low:.1e}" if rd.n_low_ops else "")
    reason = (f"worst-case rounding of {PASS_NAMES[order]}: {PASSES[order]} x (gamma_n, n = {rd.n} "
              f"(2 x {rd.d} parameters + {rd.n_in} input + {rd.n_out} output entries), u = {rd.u:.1e} ({dtype}){low})"
              f" x {ratio:.3g} (the terms' magnitudes / the residual's scale)")
    if math.isinf(gam):
        reason += "; n·u >= 1: this dtype cannot certify any identity of this size"
    return IdentityCheck(t.name, t.family, t.kind, order, r, tol, holds, t.expected, ok, n_hvp, len(results),
                         float(worst[1]), float(worst[2]), float(worst[3]), dtype, list(t.params),
                         verdict=verdict, tolerance_reason=reason)


def check_continuous(ctx: _Context, t: Continuous, probes: int, s: float = 0.5) -> list[IdentityCheck]:
    n_hvp = 0 if ctx._kappa is not None else 1
    kappa = ctx.kappa()
    o0, o1, o2 = [], [], []
    for _ in range(probes):
        c = t.random_coeffs(ctx.gen, ctx.theta)
        a, b, n = _continuous_probe(ctx, t, c, kappa)
        o1.append(a), o2.append(b)
        n_hvp += n
        o0.append(_finite_residual(ctx, GroupElement(t, c, s)))
    return [_check(t, 0, o0, 0, ctx), _check(t, 1, o1, 0, ctx), _check(t, 2, o2, n_hvp, ctx)]


def check_discrete(ctx: _Context, T: Discrete, probes: int) -> list[IdentityCheck]:
    out = [_check(T, 0, [_finite_residual(ctx, T)], 0, ctx)]
    if T.output_scale is not None:  # the loss is not simply transformed: (D1)/(D2) do not apply
        return out
    a = T.loss_scale
    moved = dict(ctx.theta)
    moved.update(T.apply(_sub(ctx.theta, T.params)))
    P = T.params
    o1, o2 = [], []
    g_moved = None
    for _ in range(probes):
        v = ctx.randn_like(P)
        _, g_moved, hv_moved = value_grad_hvp(ctx.L, moved, _full(T.tangent(v), ctx.theta))
        _, _, hv = value_grad_hvp(ctx.L, ctx.theta, _full(v, ctx.theta))
        o2.append(_rel(_mapped(hv_moved, ctx.theta, P), _scaled(_mapped_cot(T, hv, P, ctx.theta), a)) + (0.0,))
    if g_moved is None:
        g_moved = value_and_grad(ctx.L, moved)[1]
    o1.append(_rel(g_moved, _scaled(_mapped_cot(T, ctx.grad, P, ctx.theta), a)) + (0.0,))
    # rel(a, b): scale max(‖a‖, ‖b‖), the summed terms' magnitude ‖a‖ + ‖b‖
    o1 = [(r, x, y, max(x, y), x + y) for r, x, y, _ in o1]
    o2 = [(r, x, y, max(x, y), x + y) for r, x, y, _ in o2]
    return out + [_check(T, 1, o1, 0, ctx), _check(T, 2, o2, 2 * probes, ctx)]


def _mapped(d, like, P):
    return {n: d[n] for n in like}


def _mapped_cot(T, d, P, like):
    """T^{-T} d on the whole parameter dict (T acts as the identity outside its params)."""
    out = dict(d)
    out.update(T.cotangent(_sub(d, P)))
    return {n: out[n] for n in like}


def _scaled(d, a):
    return d if a == 1.0 else {n: a * x for n, x in d.items()}


def rejected(checks: list[IdentityCheck]) -> dict[str, bool]:
    """Per negative control: True when no order holds and the worst residual ≥ NEGATIVE_CONTROL_MIN."""
    out: dict[str, list] = {}
    for c in checks:
        if not c.expected:
            out.setdefault(c.transformation, []).append(c)
    return {n: all(not c.holds for c in cs) and max(c.residual for c in cs) >= NEGATIVE_CONTROL_MIN
            for n, cs in out.items()}


def check_all(model, loss, batch, transformations, probes: int = 2, seed: int = 0) -> list[IdentityCheck]:
    """Every identity of every transformation at the model's current θ on ``batch``.

    Continuous families: orders 0 (finite element e^{0.5 ξ_c}), 1 and 2, each with ``probes`` random
    generators ξ_c. Discrete: order 0, and (D1)/(D2) with ``probes`` random probe vectors."""
    ctx = _Context(model, loss, batch, seed)
    out = []
    for t in transformations:
        if isinstance(t, dict):
            t = Transformation.from_json(t)
        if isinstance(t, Continuous):
            out += check_continuous(ctx, t, probes)
        elif isinstance(t, Discrete):
            out += check_discrete(ctx, t, probes)
        else:
            raise TypeError(f"not a transformation: {t!r}")
    return out


# ----------------------------------------------------------------------------- GL matrix form (rows 6a, 7a)
@dataclass
class GLMatrixCheck:
    transformation: str
    residual: float          # worst block: max|lhs − rhs| / max(max|lhs|, max|rhs|)
    per_block: list          # the same, per block (per head)
    lhs_norms: list          # ‖lhs‖_F per block (how much the loss sees this head)


def _block_cols(x, d, i):
    return x.index_select(d, torch.as_tensor(i, device=x.device)).movedim(d, -1).reshape(-1, len(i))


def gl_matrix_check(model, loss, batch, t) -> GLMatrixCheck:
    """The first-order GL identity as a k×k matrix per block, all k² entries at once:
    Σ_"M" X(θ)ᵀ X(g) = Σ_"-MT" Y(g)ᵀ Y(θ), i.e. W_Qᵀ G_Q = G_Kᵀ W_K per head (row 6a; biases as extra
    rows) and W_Vᵀ G_V = G_O W_Oᵀ (row 7a). X, Y: the block's selected positions as columns. It is the
    statement ⟨g, ξ_M⟩ = tr((lhs − rhs) M) = 0 for every M, so it holds entrywise exactly when the family is
    a symmetry; a wrong pairing (query head h with key head h') fails by O(1)."""
    theta = named_params(model)
    _, g = value_and_grad(loss_function(model, loss, batch), theta)
    per, norms = [], []
    for b in t.blocks:
        lhs = sum(_block_cols(theta[p], d, i).T @ _block_cols(g[p], d, i) for p, d, i, m in b if m == "M")
        rhs = sum(_block_cols(g[p], d, i).T @ _block_cols(theta[p], d, i) for p, d, i, m in b if m == "-MT")
        scale = max(float(lhs.abs().max()), float(rhs.abs().max()), _TINY)
        per.append(float((lhs - rhs).abs().max()) / scale)
        norms.append(float(torch.linalg.matrix_norm(lhs)))
    return GLMatrixCheck(t.name, max(per), per, norms)
