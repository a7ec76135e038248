"""Fixed points of discrete symmetries and the block structure they force (theory §1.4, R10; rows 10b, 11a).

For an orthogonal involution T (a neuron swap, a sign flip / mirror) with L(Tθ) = L(θ), at a fixed point
Tθ = θ the gradient is T-invariant and H commutes with T. With the projectors P± = (I ± T)/2:

* P₋ g = 0                       (for a mirror: the gradient on the flipped slices vanishes; for a swap: g_i = g_j)
* P₊ H P₋ = 0                    (the antisymmetric subspace is H-invariant; for a mirror: the cross block
                                  H_{rest, unit} is zero)

`involution_check` measures both at the current θ; `to_fixed_point` moves θ onto Fix(T) by θ ← P₊θ.

For the dead unit of an odd activation σ (the sign-flip fixed point θ_i = 0) the unit's own block is
[[0, Bᵀ], [B, 0]] in the coordinates ((w_in,i, b_i), w_out,i), with
B = σ'(0) Σ_n ∂L/∂z_n [x_n; 1]ᵀ (z: the consumer's output, x: the producer's input, n over every example
and token), so spec(H_ii) = {±σ_j(B)} ∪ {0}: a strict saddle unless B = 0 (`dead_unit_spectrum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eqlab.analyses.curvature.functional import (forward, loss_function, named_params, norm, value_and_grad,
                                           value_grad_hvp)
from eqlab.analyses.transforms import Discrete


def _full(v, like):
    return {n: v[n] if n in v else torch.zeros_like(p) for n, p in like.items()}


def _apply(T: Discrete, v: dict) -> dict:
    out = dict(v)
    out.update(T.tangent({n: v[n] for n in T.params}))
    return out


def _proj(T, v, sign):
    tv = _apply(T, v)
    return {n: 0.5 * (v[n] + sign * tv[n]) for n in v}


def to_fixed_point(model, T: Discrete) -> float:
    """θ ← (θ + Tθ)/2 in place (a point of Fix(T)); returns the distance moved ‖P₋θ‖.

    The new value is computed as P₊θ = ½(θ + Tθ), not as θ − P₋θ: for a swap both units get
    ½(θ_i + θ_j) = ½(θ_j + θ_i) (IEEE addition commutes) and for a flip ½(θ_i − θ_i) = 0, so the result is
    exactly T-invariant, bit for bit, on every CPU (θ − ½(θ_i − θ_j) and θ_j + ½(θ_i − θ_j) can differ by an ulp)."""
    theta = named_params(model)
    th = {n: theta[n] for n in T.params}
    minus, plus = _proj(T, th, -1.0), _proj(T, th, +1.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in plus:
                p.copy_(plus[n])
    return float(norm(minus))


@dataclass
class FixedPointCheck:
    distance: float      # ‖P₋θ‖ / ‖θ_P‖: 0 on Fix(T)
    grad: float          # ‖P₋g‖ / ‖g‖
    block: float         # max over probes ‖P₊ H P₋v‖ / ‖H P₋v‖
    probes: int


def involution_check(model, loss, batch, T: Discrete, probes: int = 3, seed: int = 0) -> FixedPointCheck:
    """Gradient invariance and H-invariance of the antisymmetric subspace of T at the current θ."""
    theta = named_params(model)
    L = loss_function(model, loss, batch)
    P = T.params
    th = {n: theta[n] for n in P}
    dist = float(norm(_proj(T, th, -1.0)) / norm(th))
    _, g = value_and_grad(L, theta)
    rg = float(norm(_proj(T, {n: g[n] for n in P}, -1.0)) / norm(g))
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(probes):
        v = {n: torch.randn(theta[n].shape, generator=gen, dtype=torch.float64).to(theta[n]) for n in P}
        v = _proj(T, v, -1.0)
        _, _, hv = value_grad_hvp(L, theta, _full(v, theta))
        # P₊ acts as the identity outside T's parameters: that part of Hv must vanish too
        sym = _proj(T, {n: hv[n] for n in P}, +1.0)
        rest = {n: hv[n] for n in theta if n not in P}
        num = float(torch.sqrt(norm(sym) ** 2 + (norm(rest) ** 2 if rest else 0.0)))
        worst = max(worst, num / max(float(norm(hv)), 1e-300))
    return FixedPointCheck(dist, rg, worst, probes)


# ------------------------------------------------------------------------------------------- dead units
@dataclass
class DeadUnit:
    eigenvalues: torch.Tensor   # spec(H_ii), ascending
    predicted: torch.Tensor     # {±σ_j(B)} ∪ {0}, ascending
    B: torch.Tensor             # (consumer outputs) × (producer inputs + 1)
    grad: float                 # ‖g_i‖ / ‖g‖
    cross: float                # ‖H_{rest,i}‖_F / ‖H_{:,i}‖_F
    spectrum: float             # max |eig − predicted| / σ_max(B)
    column_norm: float = 0.0    # ‖H_{:,i}‖_F: the size the rounding of the unit's HVP columns scales with


def _unit_slices(producer, consumer, unit):
    """(param, dim, index) of unit ``unit``: the producer's row and bias entry, the consumer's column
    (nn.Linear convention: weights are (out, in))."""
    return [(f"{producer}.weight", 0, unit), (f"{producer}.bias", 0, unit), (f"{consumer}.weight", 1, unit)]


def dead_unit_spectrum(model, loss, batch, producer: str, consumer: str, unit: int,
                       slope_at_zero: float = 1.0) -> DeadUnit:
    """Block Hessian of one unit between two nn.Linear modules ``producer`` -> σ -> ``consumer`` (module
    names), compared with ±σ_j(B). ``slope_at_zero`` = σ'(0) (1 for tanh). Valid at θ_i = 0; off it the
    residuals measure how far the structure is broken."""
    theta = named_params(model)
    L = loss_function(model, loss, batch)
    slices = _unit_slices(producer, consumer, unit)
    basis = []  # (param, flat index) of every coordinate of the unit, ordered (w_in, b, w_out)
    for p, d, i in slices:
        x = theta[p]
        idx = torch.arange(x.numel()).reshape(x.shape).select(d, i).reshape(-1)
        basis += [(p, int(k)) for k in idx]
    # the off-block part of each column H e_k is read off directly (he with the unit's own entries zeroed),
    # never as ‖he‖² − ‖col‖²: that difference cancels to ~sqrt(eps)·‖he‖ when the off block is ~0
    off_mask = {n: torch.ones_like(t) for n, t in theta.items()}
    for p, k in basis:
        off_mask[p].view(-1)[k] = 0.0
    cols, cross2, tot2 = [], 0.0, 0.0
    for p, k in basis:
        e = {n: torch.zeros_like(t) for n, t in theta.items()}
        e[p].view(-1)[k] = 1.0
        _, g, he = value_grad_hvp(L, theta, e)
        col = torch.stack([he[q].reshape(-1)[j] for q, j in basis])
        cols.append(col)
        tot2 += float(norm(he)) ** 2
        cross2 += float(norm({n: he[n] * off_mask[n] for n in he})) ** 2
    Hii = torch.stack(cols, 1)
    Hii = 0.5 * (Hii + Hii.T)
    gi = torch.stack([g[q].reshape(-1)[j] for q, j in basis])
    B = _dead_unit_B(model, loss, batch, producer, consumer, slope_at_zero)
    s = torch.linalg.svdvals(B)
    pred = torch.cat([s, -s, torch.zeros(len(basis) - 2 * len(s), dtype=s.dtype)]).sort().values
    ev = torch.linalg.eigvalsh(Hii)
    return DeadUnit(ev, pred, B, float(gi.norm() / norm(g)), (cross2 / max(tot2, 1e-300)) ** 0.5,
                    float((ev - pred).abs().max() / s.max()), tot2 ** 0.5)


def _dead_unit_B(model, loss, batch, producer, consumer, slope):
    """σ'(0) Σ_n ∂L/∂z_n [x_n; 1]ᵀ from the producer's input x and the consumer's output z (forward hooks)."""
    seen = {}
    hooks = [model.get_submodule(producer).register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0])),
             model.get_submodule(consumer).register_forward_hook(lambda m, i, o: seen.__setitem__("z", o))]
    try:
        theta = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}  # z needs a graph
        inputs, targets = batch
        out = forward(model, theta, inputs)
        value = loss(out, targets)
        (dz,) = torch.autograd.grad(value, seen["z"])
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"].detach()
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], -1).reshape(-1, x.shape[-1] + 1)
    return slope * dz.reshape(-1, dz.shape[-1]).T @ x1
