"""Conserved quantities of continuous symmetries and their exact one-step changes under real optimizers
(theory §1.2, R2; catalog rows 5b, 6b, 14).

For a family of transformations (analyses.transforms) the quantity is

* ScaleFamily (rescale, BN scale, LN-gain rescale): one number per generator, Q_k(θ) = θᵀD_kθ with the
  diagonal generator D_k, e.g. ‖w_in,i‖² + b_i² − ‖w_out,i‖² for ReLU unit i, ‖θ_c‖² for a BN channel;
* GLFamily (Q/K, V/O per head, deep linear): one k×k matrix per block, C = Σ_"M" XᵀX − Σ_"-MT" YᵀY
  (X, Y: the block's k selected positions as columns), e.g. D_h = W_Qᵀ W_Q − W_Kᵀ W_K;
* TranslationFamily (softmax, key bias, LN stream): one number per generator, Q_k(θ) = ⟨v_k, θ⟩,
  e.g. the column sums 1ᵀW_U of the unembedding.

Quadratic ones are Q(θ) = B(θ, θ) for a bilinear B, and the symmetry says B(θ, g) + B(g, θ) = 0 (the
first-order identity ⟨g, ξ⟩ = 0 for every generator in the family). An optimizer step θ' = aθ − η u
therefore changes Q by exactly

    Q(θ') = a² Q(θ) − aη [B(θ, u) + B(u, θ)] + η² Q(u),

in which the gradient part of u drops out of the middle term. For plain SGD (a = 1, u = g) this is
ΔQ = η² Q(g) = η² gᵀAg; for translations Q(θ') = a Q(θ) − η Q(u) and Q(g) = 0, so SGD conserves them
exactly at any step size. torch.optim.SGD with momentum μ, dampening τ, weight decay λ (added to the
gradient) and the buffer b of the previous step:

    b_new = μ b + (1 − τ)(g + λθ)            (first step: b_new = g + λθ)
    plain:    θ' = θ − η b_new          = (1 − η(1−τ)λ) θ − η[(1−τ) g + μ b]
    nesterov: θ' = θ − η(g + λθ + μ b_new)

so a = 1 − ηλ·c_g and u = c_g g + c_b b with (c_g, c_b) = (1−τ, μ), or (1 + μ(1−τ), μ²) for Nesterov
(first step: c_g = 1 or 1 + μ, c_b = 0). The velocity term −2aη c_b B(θ, b) (symmetrised) is the exact
momentum correction; weight decay enters through a² (the (1 − ηλ)² factor). Adam has no such law: its
update is not a combination of g and the state that B(θ, ·) annihilates, so its drift is O(η)
(`drift_per_step`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from eqlab.analyses.curvature.functional import named_params, norm
from eqlab.analyses.identities import chain_length, gamma, unit_roundoff
from eqlab.analyses.transforms import Continuous, GLFamily, ScaleFamily, TranslationFamily

# Verdicts of one replayed step (stored in the `conservation` table): the law holds / is violated beyond
# the rounding level of the compared terms; not_discriminating: a generic first-order change of this step
# is itself below that level, so a broken law would not show; no_law: the optimizer has none (Adam).
VERDICTS = ("holds", "violated", "not_discriminating", "no_law")
PASSES = 2  # the gradient's backward pass, then the step and the Q sums (each a γ_n-bounded pass)

# ------------------------------------------------------------------------------------------- the forms
def _slice(x: Tensor, d, i):
    return x if d is None else x.index_select(d, torch.as_tensor(i, device=x.device))


def _cols(x: Tensor, d: int, i) -> Tensor:
    """The block's k selected positions along axis d as the columns of a matrix (all other axes as rows)."""
    return x.index_select(d, torch.as_tensor(i, device=x.device)).movedim(d, -1).reshape(-1, len(i))


def is_quadratic(t: Continuous) -> bool:
    return isinstance(t, (ScaleFamily, GLFamily))


def bilinear(t: Continuous, x, y) -> Tensor:
    """B(x, y), flattened: one entry per generator (ScaleFamily) or the k×k matrices of the blocks
    (GLFamily), with Q(θ) = B(θ, θ)."""
    if isinstance(t, ScaleFamily):
        return torch.stack([sum(k * (_slice(x[p], d, i) * _slice(y[p], d, i)).sum() for p, d, i, k in g)
                            for g in t.generators])
    if isinstance(t, GLFamily):
        mats = []
        for b in t.blocks:
            mats.append(sum((1.0 if m == "M" else -1.0) * _cols(x[p], d, i).T @ _cols(y[p], d, i)
                            for p, d, i, m in b).reshape(-1))
        return torch.cat(mats)
    raise TypeError(f"{type(t).__name__} has no quadratic conserved quantity")


def linear(t: TranslationFamily, x) -> Tensor:
    """⟨v_k, x⟩ for every generator v_k (the translation's own coordinates), by one VJP in c."""
    c = torch.zeros(t.n_generators, dtype=torch.float64, requires_grad=True)
    v = t.vector(x, c)
    (out,) = torch.autograd.grad(sum((v[n] * x[n].detach()).sum() for n in v), c)
    return out


def quantity(t: Continuous, theta) -> Tensor:
    """Q(θ) as a flat vector (see the module docstring for what each family conserves)."""
    theta = {n: theta[n].detach() for n in t.params}
    return bilinear(t, theta, theta) if is_quadratic(t) else linear(t, theta)


def block_matrices(t: GLFamily, flat: Tensor) -> list[Tensor]:
    """Split a GLFamily quantity into its per-block k×k matrices (per head: D_h)."""
    out, start = [], 0
    for b in t.blocks:
        k = len(b[0][2])
        out.append(flat[start:start + k * k].reshape(k, k))
        start += k * k
    return out


# ----------------------------------------------------------------------------------- one-step prediction
def predict_after(t: Continuous, theta, grad, lr: float, a: float = 1.0, c_g: float = 1.0, buf=None,
                  c_b: float = 0.0) -> Tensor:
    """Q(θ') for θ' = aθ − η(c_g g + c_b b), using the symmetry B(θ, g) + B(g, θ) = 0 (resp. Q(g) = 0)."""
    P = t.params
    th = {n: theta[n].detach() for n in P}
    u = {n: c_g * grad[n].detach() + (c_b * buf[n].detach() if buf is not None and c_b else 0.0) for n in P}
    Q = quantity(t, th)
    if not is_quadratic(t):
        bu = linear(t, buf) * c_b if buf is not None and c_b else torch.zeros_like(Q)
        return a * Q - lr * bu
    cross = torch.zeros_like(Q)
    if buf is not None and c_b:
        b = {n: buf[n].detach() for n in P}
        cross = c_b * (bilinear(t, th, b) + bilinear(t, b, th))
    return a * a * Q - a * lr * cross + lr * lr * bilinear(t, u, u)


def sgd_coefficients(group: dict, has_buffer: bool) -> tuple[float, float, float]:
    """(a, c_g, c_b) of one torch.optim.SGD step for a parameter group (see the module docstring)."""
    if group.get("maximize"):
        raise NotImplementedError("maximize=True")
    lr, mu, tau, lam = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    if mu == 0:
        c_g, c_b = 1.0, 0.0
    elif group["nesterov"]:
        c_g, c_b = (1.0 + mu * (1.0 - tau), mu * mu) if has_buffer else (1.0 + mu, 0.0)
    else:
        c_g, c_b = (1.0 - tau, mu) if has_buffer else (1.0, 0.0)
    return 1.0 - lr * lam * c_g, c_g, c_b


# ------------------------------------------------------------------------------------- real optimizers
@dataclass
class Step:
    before: Tensor           # Q(θ_t)
    after: Tensor            # Q(θ_{t+1}) measured
    predicted: Tensor | None  # Q(θ_{t+1}) from the exact law (None: the optimizer has none)
    grad_term: Tensor        # Q(g_t) (quadratic) or ⟨v, g_t⟩ (translation): the η² coefficient of SGD
    lr: float
    scale: float             # a generic first-order change of the same step: η‖u‖‖ξ_1(θ)‖
    theta_norm: float = 0.0  # ‖θ_P‖ on the family's parameters
    rounding: float = 0.0    # rounding level of ‖measured − predicted change‖ (`rounding_level`)
    rounding_reason: str = ""

    @property
    def change(self) -> Tensor:
        return self.after - self.before

    @property
    def error(self) -> float:
        """‖measured − predicted change‖ (NaN without a law)."""
        if self.predicted is None:
            return math.nan
        return float(torch.linalg.vector_norm(self.change - (self.predicted - self.before)))

    def _denominator(self) -> float:
        return float(torch.linalg.vector_norm(self.predicted - self.before)) + self.scale + self.rounding

    @property
    def tolerance(self) -> float:
        """The rounding level in the units of ``residual``."""
        return math.nan if self.predicted is None else self.rounding / max(self._denominator(), _TINY)

    @property
    def verdict(self) -> str:
        if self.predicted is None:
            return "no_law"
        if self.scale <= self.rounding:
            return "not_discriminating"
        return "holds" if self.error <= self.rounding else "violated"

    @property
    def relative(self) -> float:
        """‖measured − predicted change‖ / ‖predicted change‖ (meaningful when the change is not ~0)."""
        pc = self.predicted - self.before
        return float(torch.linalg.vector_norm(self.change - pc) / torch.linalg.vector_norm(pc))

    @property
    def residual(self) -> float:
        """‖measured − predicted change‖ / (‖predicted change‖ + generic scale + rounding level); NaN without
        a law. The rounding level in the denominator keeps an exactly conserved Q with a zero gradient (a
        bias before BN: 1e-17/1e-17) from reading O(1)."""
        return math.nan if self.predicted is None else self.error / max(self._denominator(), _TINY)


_TINY = 1e-300


def rounding_level(t: Continuous, theta, theta_after, u_step, g_all: float, lr: float, a: float,
                   n: int, unit: float) -> tuple[float, str]:
    """PASSES·γ_n(u)·R: the worst-case rounding of ‖measured − predicted ΔQ‖ (the model of
    `analyses.identities`: a pass of n-term sums, n = 2d + inputs + outputs, leaves γ_n(u) relative to the
    magnitudes summed). R bounds Σ|terms| of everything the comparison computes:
      quadratic Q = B(θ, θ): Σ|x_i y_i| ≤ w‖x‖‖y‖ (w: block width of a GL family, max|coefficient| of a
      scale family), over Q(θ), Q(θ'), the dropped cross term aη[B(θ, u) + B(u, θ)] (zero by the symmetry,
      computed to within the gradient's rounding: magnitude 2|a|η‖θ_P‖(‖u_P‖ + ‖g‖), ‖g‖ the full gradient
      as in the order-1 identity) and η²Q(u);
      linear Q_k = ⟨v_k, θ⟩: Σ_k ‖v_k‖‖x‖ ≤ √K‖ξ_1‖‖x‖ (ξ_1 = Σ_k v_k, disjoint supports).
    The optimizer's own rounding of θ' (a few ops per coordinate, relative u each) is inside the ‖θ'‖² term."""
    P = t.params
    th, tha = float(norm({n_: theta[n_] for n_ in P})), float(norm({n_: theta_after[n_] for n_ in P}))
    un = float(norm({n_: u_step[n_] for n_ in P}))
    if is_quadratic(t):
        if isinstance(t, GLFamily):
            w = max(len(b[0][2]) for b in t.blocks)
        else:
            w = max(abs(float(k)) for gen in t.generators for *_, k in gen)
        R = w * (th * th + tha * tha + 2 * abs(a) * lr * th * (un + g_all) + lr * lr * un * un)
        what = f"w = {w:g}, ‖θ_P‖ = {th:.3g}, ‖θ'_P‖ = {tha:.3g}, η‖u_P‖ = {lr * un:.3g}, η‖g‖ = {lr * g_all:.3g}"
    else:
        c = torch.ones(t.n_generators, dtype=torch.float64)
        xi1 = float(norm(t.xi({n_: theta[n_] for n_ in P}, c)))
        R = math.sqrt(t.n_generators) * xi1 * (th + tha + lr * (un + g_all))
        what = f"K = {t.n_generators}, ‖ξ_1‖ = {xi1:.3g}, ‖θ_P‖ = {th:.3g}, η(‖u_P‖ + ‖g‖) = {lr * (un + g_all):.3g}"
    level = PASSES * gamma(n, unit) * R
    return level, f"{PASSES}·γ_n(u)·R = {level:.3g}: n = {n} (2d + inputs + outputs), u = {unit:.3g}, R = {R:.3g} ({what})"


def _grads(model, loss, batch) -> dict:
    model.zero_grad(set_to_none=True)
    inputs, targets = batch
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    loss(out, targets).backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _ones_scale(t: Continuous, theta, u, lr, g_all: float = 0.0) -> float:
    """η(‖u_P‖ + ‖g‖)‖ξ_1(θ)‖: how much Σ_k Q_k would move at first order under a step of this size not
    tied to the symmetry. The full gradient norm ‖g‖ keeps the scale meaningful when the family's own
    gradient vanishes identically (a bias before BatchNorm), where ‖u_P‖ alone would be 0."""
    c = torch.ones(t.n_generators, dtype=torch.float64)
    xi = t.xi({n: theta[n] for n in t.params}, c)
    return float(lr * (float(norm({n: u[n] for n in t.params})) + g_all) * norm(xi))


def run_steps(model, loss, batch, t: Continuous, optimizer: torch.optim.Optimizer, steps: int = 3) -> list[Step]:
    """Take ``steps`` real optimizer steps on one fixed batch, recording Q before and after each, and the
    exact prediction when the optimizer is torch.optim.SGD (any momentum / dampening / Nesterov / weight
    decay). The model must be float64 for the prediction to be meaningful to ~1e-12."""
    name_of = {p: n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    n_chain = chain_length(model, batch)
    unit = unit_roundoff(next(iter(params.values())).dtype)
    out = []
    for _ in range(steps):
        g = _grads(model, loss, batch)
        theta = named_params(model)
        theta = {n: x.clone() for n, x in theta.items()}
        before = quantity(t, theta)
        pred, u, lr, a = None, g, optimizer.param_groups[0]["lr"], 1.0
        if type(optimizer) is torch.optim.SGD:
            group = next(gr for gr in optimizer.param_groups if any(name_of[p] in t.params for p in gr["params"]))
            if not {id(params[n]) for n in t.params} <= {id(p) for p in group["params"]}:
                raise ValueError("the family's parameters are split across parameter groups")
            bufs = {n: optimizer.state.get(params[n], {}).get("momentum_buffer") for n in t.params}
            has = all(b is not None for b in bufs.values())
            a, c_g, c_b = sgd_coefficients(group, has)
            buf = {n: b.clone() for n, b in bufs.items()} if has else None
            pred = predict_after(t, theta, g, group["lr"], a, c_g, buf, c_b)
            u = {n: c_g * g[n] + (c_b * buf[n] if has else 0.0) for n in t.params}
            lr = group["lr"]
        optimizer.step()
        theta_after = {n: x.detach().clone() for n, x in named_params(model).items()}
        after = quantity(t, theta_after)
        gt = bilinear(t, g, g) if is_quadratic(t) else linear(t, g)
        g_all = float(norm(g))
        level, why = rounding_level(t, theta, theta_after, u, g_all, lr, a, n_chain, unit)
        out.append(Step(before, after, pred, gt, lr, _ones_scale(t, theta, u, lr, g_all),
                        float(norm({n: theta[n] for n in t.params})), level, why))
    return out


def drift_per_step(model, loss, batch, t: Continuous, make_optimizer, lr: float) -> Tensor:
    """ΔQ of one step of ``make_optimizer(params, lr)`` from the model's current θ (model restored)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        opt = make_optimizer(model.parameters(), lr)
        (s,) = run_steps(model, loss, batch, t, opt, steps=1)
        return s.change
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
