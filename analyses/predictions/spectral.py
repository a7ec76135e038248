"""Spectral consequences that hold exactly at every θ (rows 12, 13, 15, 16), against dense float64 eigh.

* 15 (R7): H Aθ = −Aᵀg in the eigenbasis: ⟨u_i, Aᵀg⟩ = −λ_i⟨u_i, Aθ⟩ for every eigenpair. For a
  scale-invariant block S (A = P_S), with weights w_i = ⟨u_i, θ_S⟩²: Σλ_i w_i = θ_SᵀHθ_S = 0 and
  Σλ_i² w_i = ‖Hθ_S‖² = ‖g_S‖².
* 16 (R8): the same weights make the spectral measure of θ_S mean-zero, so its negative and positive
  mass balance, Σ_{λ<0}|λ|w = Σ_{λ>0}λw, and g_S ≠ 0 forces λ_min < 0. Quantitatively: a mean-zero
  measure on [λ_min, λ_max] has second moment ≤ |λ_min|λ_max·mass (Σ(λ−λ_min)(λ_max−λ)w ≥ 0), hence
  λ_min ≤ −‖g_S‖² / (λ_max ‖θ_S‖²).
* 13 (R5): the explicit symmetry vectors ξ_k = A_kθ. Their Rayleigh quotients are exactly
  −⟨ξ_k, A_kᵀg⟩/‖ξ_k‖² at every θ (0 at critical points; 0 for scale-invariant blocks); translations
  (A = 0) are exact null vectors at every θ, so #{|λ| ≈ 0} ≥ rank of the translation vectors always and
  ≥ rank of all of them at a critical point.
* 12 (D2): an orthogonal symmetry T gives H(Tθ) = T H(θ) Tᵀ, hence identical spectra; a non-orthogonal
  one (a finite ReLU rescale) is still a congruence but changes the spectrum (the control).
"""
from __future__ import annotations

import torch

from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.predictions._common import (Prediction, _TINY, basis_coeffs, dense_at, generator, grad_dict, rel,
                                          with_params)
from eqlab.analyses.transforms import Continuous, Discrete


# --------------------------------------------------------------------------------------------- row 15
def alignment(model, loss, batch, t: Continuous, c=None, dense=None) -> Prediction:
    """Per-eigenpair ⟨u_i, Aᵀg⟩ vs −λ_i⟨u_i, Aθ⟩ over the full dense spectrum (all parameters).
    residual = ‖a − b‖/max(‖a‖, ‖b‖) over the vector of pairs; details.worst_pair: the worst single pair
    among those carrying ≥ 1e-6 of the largest term, relative to its own size."""
    D = dense or dense_at(model, loss, batch)
    c = torch.ones(t.n_generators, dtype=torch.float64) if c is None else c
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    xi, atg = generator(t, theta, grad_dict(model, loss, batch), c)
    U, lam = D.evecs, D.evals
    a, b = U.T @ D.flat(atg), -lam * (U.T @ D.flat(xi))
    scale = torch.maximum(a.abs(), b.abs())
    keep = scale >= 1e-6 * float(scale.max())
    worst = float(((a - b).abs()[keep] / scale[keep]).max())
    return Prediction("15", "<u_i,A^T g> + lambda_i <u_i,A theta>", float(a.norm()), float(b.norm()), rel(a, b),
                      details={"worst_pair": worst, "pairs": int(keep.sum()), "transformation": t.name})


def scale_invariant_sums(model, loss, batch, S, dense=None) -> list[Prediction]:
    """Σλ_i⟨u_i,θ_S⟩² = 0 (residual relative to Σ|λ_i|⟨u_i,θ_S⟩²) and Σλ_i²⟨u_i,θ_S⟩² = ‖g_S‖²."""
    D = dense or dense_at(model, loss, batch)
    th_S = D.flat({n: dict(model.named_parameters())[n].detach().double() for n in S})
    g_S = torch.zeros_like(D.grad)
    idx = D.block(S)
    g_S[idx] = D.grad[idx]
    w = (D.evecs.T @ th_S) ** 2
    lam = D.evals
    m1, a1 = float((lam * w).sum()), float((lam.abs() * w).sum())
    m2, g2 = float((lam ** 2 * w).sum()), float(g_S @ g_S)
    return [Prediction("15", "sum lambda_i <u_i,theta_S>^2", m1, 0.0, abs(m1) / max(a1, _TINY),
                       details={"abs_mass": a1}),
            Prediction("15", "sum lambda_i^2 <u_i,theta_S>^2", m2, g2, abs(m2 - g2) / max(m2, g2, _TINY))]


# --------------------------------------------------------------------------------------------- row 16
def indefiniteness(model, loss, batch, S, dense=None) -> list[Prediction]:
    """Negative/positive θ_S-mass balance, and λ_min against the bound −‖g_S‖²/(λ_max‖θ_S‖²)
    (residual 0 when λ_min ≤ bound, else by how much relative to |bound|)."""
    D = dense or dense_at(model, loss, batch)
    th_S = D.flat({n: dict(model.named_parameters())[n].detach().double() for n in S})
    idx = D.block(S)
    gS2 = float((D.grad[idx] ** 2).sum())
    w = (D.evecs.T @ th_S) ** 2
    lam = D.evals
    neg, pos = float((lam.abs() * w)[lam < 0].sum()), float((lam * w)[lam > 0].sum())
    lmin, lmax = float(lam.min()), float(lam.max())
    bound = -gS2 / (lmax * float(th_S @ th_S))
    return [Prediction("16", "negative vs positive theta_S spectral mass", neg, pos,
                       abs(neg - pos) / max(neg, pos, _TINY), details={"grad_S_sq": gS2}),
            Prediction("16", "lambda_min <= -|g_S|^2/(lambda_max |theta_S|^2)", lmin, bound,
                       max(0.0, lmin - bound) / max(abs(bound), _TINY),
                       details={"lambda_max": lmax, "grad_S_sq": gS2})]


# --------------------------------------------------------------------------------------------- row 13
def _is_symmetry(t) -> bool:
    return t.expected and not t.output_scale and not t.loss_rate


def zero_modes(model, loss, batch, families, rtol: float = 1e-9, dense=None) -> dict:
    """Explicit vectors ξ_k = A_kθ of every generator of every (symmetry) family: Gram ranks, Rayleigh
    quotients vs −⟨ξ,Aᵀg⟩/‖ξ‖² (exact at every θ, residual in units of λ_max), translation null residuals
    ‖Hξ‖/(λ_max‖ξ‖), and the dense count of |λ| ≤ rtol·λ_max. Negative controls (expected=False) are
    measured the same way, reported separately."""
    D = dense or dense_at(model, loss, batch)
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    g = grad_dict(model, loss, batch)
    vecs, flat_vecs, ray, null, ctrl = [], [], [], [], []
    for t in families:
        if t.expected and not _is_symmetry(t):
            continue  # equivariant families (homogeneity) have Ψ ≠ 0: their Rayleigh quotient is not predicted here
        for c in basis_coeffs(t):
            xi, atg = generator(t, theta, g, c)
            v, av = D.flat(xi), D.flat(atg)
            nv = float(v.norm())
            if nv == 0:
                continue
            meas, pred = float(v @ D.H @ v) / nv ** 2, -float(v @ av) / nv ** 2
            r = abs(meas - pred) / D.lam_max
            (ray if t.expected else ctrl).append(r)
            if t.expected:
                vecs.append(v / nv)
                if all(float(x.abs().max()) == 0 for x in atg.values()) and _is_symmetry(t):  # translation
                    flat_vecs.append(v / nv)
                    null.append(float((D.H @ v).norm()) / (D.lam_max * nv))

    def rank(vs):
        if not vs:
            return 0
        s = torch.linalg.svdvals(torch.stack(vs, 1))
        return int((s > 1e-8 * s.max()).sum())

    n_zero = int((D.evals.abs() <= rtol * D.lam_max).sum())
    return {"rank_all": rank(vecs), "rank_translations": rank(flat_vecs), "n_zero_dense": n_zero,
            "rayleigh": Prediction("13", "Rayleigh(A theta) + <A theta, A^T g>/|A theta|^2 (units of lambda_max)",
                                   max(ray, default=0.0), 0.0, max(ray, default=0.0)),
            "translation_null": Prediction("13", "|H v|/(lambda_max |v|), translations", max(null, default=0.0),
                                           0.0, max(null, default=0.0)),
            "count": Prediction("13", "#(|lambda| <= rtol lambda_max) - rank(translation vectors)", n_zero,
                                rank(flat_vecs), max(0, rank(flat_vecs) - n_zero) / max(rank(flat_vecs), 1)),
            "control_rayleigh": max(ctrl, default=float("nan"))}


# --------------------------------------------------------------------------------------------- row 12
def _matrix_of(T: Discrete, D) -> torch.Tensor:
    """T_lin on the dense coordinates, column by column (small models only)."""
    cols = []
    for j in range(D.H.shape[0]):
        e = torch.zeros(D.H.shape[0], dtype=torch.float64)
        e[j] = 1
        ed = D.space.unflatten(e)
        moved = dict(ed)
        moved.update(T.tangent({n: ed[n] for n in T.params}))
        cols.append(D.flat(moved))
    return torch.stack(cols, 1)


def discrete_spectrum(model, loss, batch, T: Discrete, k: int = 5) -> list[Prediction]:
    """Spectrum of H at θ and at Tθ: dense (all eigenvalues) and Lanczos top-k, residual in units of λ_max;
    plus the congruence H(Tθ) = T^{-T}H(θ)T^{-1} (which holds for any linear symmetry) and ‖TᵀT − I‖."""
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    moved = with_params(model, T.apply({n: theta[n] for n in T.params}))
    A, B = dense_at(model, loss, batch), dense_at(moved, loss, batch)
    M = _matrix_of(T, A)
    Minv = torch.linalg.inv(M)
    cong = rel(B.H, Minv.T @ A.H @ Minv)
    orth = float((M.T @ M - torch.eye(M.shape[0], dtype=torch.float64)).abs().max())
    dspec = float((A.evals - B.evals).abs().max()) / A.lam_max
    tops = [lanczos(lambda v, H=D.H: H @ v, D.H.shape[0], k=k, tol=1e-12).eigenvalues for D in (A, B)]
    lspec = float((tops[0] - tops[1]).abs().max()) / A.lam_max
    return [Prediction("12", "max|lambda_i(theta) - lambda_i(T theta)|/lambda_max (dense)", dspec, 0.0, dspec,
                       details={"orthogonality": orth, "congruence": cong, "transformation": T.name}),
            Prediction("12", "top-k Lanczos difference / lambda_max", lspec, 0.0, lspec,
                       details={"k": k, "top": [float(x) for x in tops[0]]}),
            Prediction("12", "H(T theta) vs T^-T H T^-1", cong, 0.0, cong, details={"orthogonality": orth})]
