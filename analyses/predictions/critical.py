"""Predictions that need weight decay, a critical point, or interpolation (rows 17, 5c/R5-WD, 6c, 8, 9c, 11b).

* 17: with L_γ = L + γ/2‖θ‖², H_γ = H + γI and θ_SᵀHθ_S = 0 for a scale-invariant block, so the radial
  Rayleigh quotient θ_SᵀH_γθ_S/‖θ_S‖² = γ exactly at every θ.
* 5c / 6c / R5-WD: for a linear symmetry A, H_γAθ = −Aᵀg_γ + γ(A + Aᵀ)θ. So for symmetric A (ReLU rescale,
  GL with symmetric M) ‖H_γAθ − 2γAθ‖ = ‖Aᵀg_γ‖, for antisymmetric A (GL rotations) ‖H_γAθ‖ = ‖Aᵀg_γ‖:
  Aθ is an eigenvector (2γ resp. 0) up to exactly ‖Aᵀg_γ‖/‖Aθ‖ ≤ ‖A‖‖g_γ‖/‖Aθ‖, i.e. O(‖g_γ‖).
* 8: GL(h) of a factorisation U V: Q = VVᵀ − UᵀU changes under SGD by exactly η²(G_VG_Vᵀ − G_UᵀG_U)
  (analyses.conservation), so ΔQ/η² is η-independent; Adam and a non-linear σ between the factors break it.
* 9c: a bias-free depth-k ReLU net at an interpolating MSE point (L = ½E‖f − y‖²) has H = E[JᵀJ] and
  Jθ = k f, so θᵀHθ = k²E‖y‖², ≤ λ_max‖θ‖²; per layer W_lᵀH_llW_l = E‖y‖².
* 11b: splitting a hidden unit of a critical narrow net into two copies with outgoing weights αw, (1−α)w
  gives a critical point of the wider net. The outgoing plateau w_i + w_j = w (n_{k+1} dimensions) has
  constant loss, so each plateau direction v_c = (e_c, −e_c) has Rayleigh quotient exactly 0; the α-line
  (v = (w, −w)) consists of critical points, so Hv = 0. Whether the other plateau directions are null
  (Hv_c = 0, the catalog's "≥ n_{k+1} zeros") depends on B_c = E[r_c σ'(z) x̃] vanishing for every output c,
  which the narrow critical point only guarantees for the contraction with w: measured, not assumed.
"""
from __future__ import annotations

import copy

import torch

from eqlab.analyses.conservation import run_steps
from eqlab.analyses.predictions._common import Prediction, _TINY, dense_at, generator, grad_dict, rel


def _theta(model):
    return {n: p.detach().double() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- row 17
def wd_radial(model, loss, batch, S, gamma: float, dense=None) -> Prediction:
    D = dense or dense_at(model, loss, batch, gamma=gamma)
    th = D.flat({n: _theta(model)[n] for n in S})
    rho = float(th @ D.H @ th / (th @ th))
    return Prediction("17", "theta_S^T H_gamma theta_S/|theta_S|^2", rho, gamma, abs(rho - gamma) / gamma)


# ------------------------------------------------------------------------------------- rows 5c, 6c, R5
def symmetry_type(t, c, theta, seed: int = 0) -> int:
    """+1 if the linear generator A (ξ_c(θ) = Aθ) is symmetric, −1 if antisymmetric, 0 otherwise."""
    gen = torch.Generator().manual_seed(seed)
    u = {n: torch.randn(theta[n].shape, generator=gen, dtype=torch.float64) for n in t.params}
    w = {n: torch.randn(theta[n].shape, generator=gen, dtype=torch.float64) for n in t.params}
    au, aw = t.xi(u, c), t.xi(w, c)
    a, b = sum(float((w[n] * au[n]).sum()) for n in t.params), sum(float((aw[n] * u[n]).sum()) for n in t.params)
    scale = max(abs(a), abs(b), _TINY)
    return 1 if abs(a - b) < 1e-12 * scale else (-1 if abs(a + b) < 1e-12 * scale else 0)


def wd_eigenvector(model, loss, batch, t, c, gamma: float, dense=None) -> Prediction:
    """Aθ as an eigenvector of H_γ: measured Rayleigh quotient vs μ = 2γ (symmetric A) or 0 (antisymmetric).
    residual = ‖H_γAθ − μAθ‖/(γ‖Aθ‖); bound = ‖Aᵀg_γ‖/(γ‖Aθ‖), which the residual equals for a symmetry
    (details.identity = rel of the two vectors), and which is O(‖g_γ‖)."""
    D = dense or dense_at(model, loss, batch, gamma=gamma)
    theta = _theta(model)
    s = symmetry_type(t, c, theta)
    if s == 0:
        raise ValueError(f"{t.name}: generator is neither symmetric nor antisymmetric")
    mu = 2 * gamma if s > 0 else 0.0
    g_gamma = D.space.unflatten(D.grad)
    xi, atg = generator(t, theta, g_gamma, c)
    v, av = D.flat(xi), D.flat(atg)
    nv = float(v.norm())
    hv = D.H @ v
    rho = float(v @ hv) / nv ** 2
    return Prediction("5c" if s > 0 else "R5-WD", "Rayleigh(A theta) under H_gamma", rho, mu,
                      float((hv - mu * v).norm()) / (gamma * nv), bound=float(av.norm()) / (gamma * nv),
                      details={"symmetric": s > 0, "identity": rel(hv - mu * v, -av), "grad_norm": float(D.grad.norm()),
                               "transformation": t.name})


def gl_modes(model, loss, batch, t, gamma: float, dense=None) -> list[Prediction]:
    """Row 6c: wd_eigenvector for a basis of M per GL block: E_ii, E_ij + E_ji (2γ) and E_ij − E_ji (0)."""
    D = dense or dense_at(model, loss, batch, gamma=gamma)
    out, start = [], 0
    for b in t.blocks:
        k = len(b[0][2])
        basis = []
        for i in range(k):
            for j in range(i, k):
                M = torch.zeros(k, k, dtype=torch.float64)
                M[i, j] += 1
                M[j, i] += 1
                basis.append(M)
                if i != j:
                    A = torch.zeros(k, k, dtype=torch.float64)
                    A[i, j], A[j, i] = 1, -1
                    basis.append(A)
        for M in basis:
            c = torch.zeros(t.n_generators, dtype=torch.float64)
            c[start:start + k * k] = M.reshape(-1)
            p = wd_eigenvector(model, loss, batch, t, c, gamma, D)
            p.row = "6c"
            out.append(p)
        start += k * k
    return out


# --------------------------------------------------------------------------------------------- row 8
def gl_step_law(model, loss, batch, t, lr: float, steps: int = 3, optimizer: str = "sgd") -> Prediction:
    """ΔQ per full-batch step on a copy of the model: SGD vs the exact law (residual), and ΔQ/η² vs Q(g)
    of the first step (measured / predicted). Adam has no law: residual = ‖ΔQ‖/(η·η_scale), see details."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(m.parameters(), lr=lr)
    st = run_steps(m, loss, batch, t, opt, steps=steps)
    first = st[0]
    meas, pred = first.change / lr ** 2, first.grad_term
    res = max(s.residual for s in st) if optimizer == "sgd" else float("nan")
    return Prediction("8", "Delta Q / eta^2 vs Q(g)", float(meas.norm()), float(pred.norm()), rel(meas, pred),
                      details={"law_residual": res, "lr": lr, "drift_over_eta": float(first.change.norm()) / lr,
                               # per step: holds / violated against its rounding level (analyses.conservation)
                               "law_verdicts": [s.verdict for s in st],
                               "law_tolerance": max(s.tolerance for s in st) if optimizer == "sgd" else float("nan")})


# --------------------------------------------------------------------------------------------- row 9c
def radial_sharpness(model, loss, batch, k: int, layers=None, dense=None) -> list[Prediction]:
    """θᵀHθ/‖θ‖² vs k²E‖y‖²/‖θ‖² (and ≤ λ_max), and per layer W_lᵀH_llW_l/‖W_l‖² vs E‖y‖²/‖W_l‖².
    details.interpolation = E‖f − y‖²/E‖y‖² (0 at an interpolating point; the prediction needs it)."""
    D = dense or dense_at(model, loss, batch)
    inputs, y = batch
    with torch.no_grad():
        f = model(inputs)
    ey2 = float((y ** 2).sum(-1).mean())
    interp = float(((f - y) ** 2).sum(-1).mean()) / ey2
    th = D.theta
    rho, pred = float(th @ D.H @ th / (th @ th)), k * k * ey2 / float(th @ th)
    lam = float(D.evals.max())
    out = [Prediction("9c", "theta^T H theta/|theta|^2", rho, pred, abs(rho - pred) / pred,
                      details={"lambda_max": lam, "below_lambda_max": rho <= lam * (1 + 1e-12),
                               "interpolation": interp})]
    theta = _theta(model)
    for name in layers or []:
        w = D.flat({name: theta[name]})
        r, p = float(w @ D.H @ w / (w @ w)), ey2 / float(w @ w)
        out.append(Prediction("9c", f"per-layer radial {name}", r, p, abs(r - p) / p))
    return out


# --------------------------------------------------------------------------------------------- row 11b
def split_unit(model, first: str, second: str, j: int, alpha: float):
    """A copy of ``model`` whose Linear ``first`` gets a duplicate of output unit j (appended last) and whose
    Linear ``second`` reads it with weights α·w_j (unit j) and (1 − α)·w_j (the copy): the same function."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    a, b = mods[first], mods[second]
    na = torch.nn.Linear(a.in_features, a.out_features + 1, bias=a.bias is not None).to(a.weight.dtype)
    nb = torch.nn.Linear(b.in_features + 1, b.out_features, bias=b.bias is not None).to(b.weight.dtype)
    with torch.no_grad():
        na.weight.copy_(torch.cat([a.weight, a.weight[j:j + 1]]))
        if a.bias is not None:
            na.bias.copy_(torch.cat([a.bias, a.bias[j:j + 1]]))
        wb = torch.cat([b.weight, (1 - alpha) * b.weight[:, j:j + 1]], 1)
        wb[:, j] *= alpha
        nb.weight.copy_(wb)
        if b.bias is not None:
            nb.bias.copy_(b.bias)
    parent_a, _, la = first.rpartition(".")
    parent_b, _, lb = second.rpartition(".")
    setattr(mods[parent_a] if parent_a else m, la, na)
    setattr(mods[parent_b] if parent_b else m, lb, nb)
    return m


def permutation_point(model, loss, batch, second: str, i: int, j: int, rtol: float = 1e-8, dense=None) -> dict:
    """Plateau vectors v_c (output weight e_c on unit i, −e_c on unit j) and the α-line v = (w, −w) at a split
    point: Rayleigh quotients (exactly 0), ‖Hv‖/λ_max per vector, and the dense count of |λ| ≤ rtol·λ_max
    against n_{k+1} (the catalog); plateau_hv lists ‖Hv_c‖/(λ_max‖v_c‖) per output c (reported, not predicted)."""
    D = dense or dense_at(model, loss, batch)
    W = dict(model.named_parameters())[f"{second}.weight"].detach()
    n_next = W.shape[0]
    vecs = []
    for c in range(n_next):
        V = torch.zeros_like(W)
        V[c, i], V[c, j] = 1.0, -1.0
        vecs.append(D.flat({f"{second}.weight": V}))
    line = torch.zeros_like(W)
    line[:, i], line[:, j] = W[:, i] + W[:, j], -(W[:, i] + W[:, j])
    lv = D.flat({f"{second}.weight": line})
    ray = [abs(float(v @ D.H @ v)) / (float(v @ v) * D.lam_max) for v in vecs]
    hv = [float((D.H @ v).norm()) / (float(v.norm()) * D.lam_max) for v in vecs]
    line_hv = float((D.H @ lv).norm()) / (float(lv.norm()) * D.lam_max)
    n_zero = int((D.evals.abs() <= rtol * D.lam_max).sum())
    return {"rayleigh": Prediction("11b", "max plateau Rayleigh / lambda_max", max(ray), 0.0, max(ray)),
            "line_null": Prediction("11b", "|H v_alpha|/(lambda_max |v_alpha|)", line_hv, 0.0, line_hv,
                                    bound=float(D.grad.norm()) / D.lam_max),
            "count": Prediction("11b", "#(|lambda| <= rtol lambda_max) vs n_{k+1}", n_zero, n_next,
                                max(0, n_next - n_zero) / n_next),
            "plateau_hv": hv, "grad_norm": float(D.grad.norm()), "evals_abs_small": D.evals.abs().sort().values[:n_next + 2]}
