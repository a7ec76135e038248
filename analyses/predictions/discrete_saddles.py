"""Saddles at the fixed points of discrete symmetries: dead and duplicated hidden units (theory §1.4,
rows 10b, 11a, 11b), matrix-free.

README (finding 6): At a dead hidden unit (its incoming weights, bias and outgoing weights zero) and at a
unit duplicated into its neighbour (the fixed point of the verified swap), the Hessian leaves the unit's
subspace invariant and its spectrum there is a small matrix built from first-order quantities alone —
[[0, Bᵀ], [B, 0]] with B = Σ δ σ'(z) x̃ᵀ for a dead unit, [[M/2, B'ᵀ], [B', 0]] for the antisymmetric
split of a duplicate — so both are saddles unless B = 0, stabilised by L2 weight decay exactly above
γ* = −λ_min. We build both points from a real unit group of a trained checkpoint, compare the top and
bottom Lanczos eigenvalues of the Hessian restricted to that subspace (and ‖(I − Q)Hv‖/‖Hv‖ for random v in
it) with that matrix, and repeat everything at the untouched trained units as the negative control.

The unit group. A verified `Permutation` of two hidden units between two per-feature linear maps
(`nn.Linear` or Hugging Face's `Conv1D`: the MLP units of a transformer, the fc units of a CNN or MLP)
names every slice a unit owns: the producer's weight row/column and bias entry (incoming, coordinates
(w_in, b) = x̃ for input x̃ = [x; 1]) and each consumer's weight column/row (outgoing, w_out). Unit groups
read through pooling or a flatten (conv channels into fc1), or through a BatchNorm (the producer is then
the BN affine with a filter upstream), are skipped: there a unit's outgoing weight multiplies several
input positions and B is no longer one outer product per token.

The statements (δ_t = ∂L/∂(consumer output at token t), L the mean loss, so the sums carry the 1/n;
s_t = σ'(z_t), s2_t = σ''(z_t), read off the activation by autograd at the unit's pre-activation z):

* dead unit (θ_unit = 0, any σ with σ(0) = 0: tanh, GELU, SiLU, ReLU): g_unit = 0 and H_{rest,unit} = 0,
  because with w_out = 0 the unit cannot change the output and with z = 0 its activation is σ(0) = 0;
  H_{unit,unit} = [[0, Bᵀ], [B, 0]], B = Σ_t δ_t (s_t x̃_t)ᵀ, so spec = {±σ_j(B)} ∪ {0} (the second
  derivatives along w_in carry a factor w_out = 0, those along w_out a factor σ(0)² = 0). For ReLU
  torch's σ'(0) = 0, so B = 0 and the block is 0: true, but nothing is tested (inconclusive). The unit's
  coordinates are the −1 space of the sign flip of its slices (`subspace.EigenspaceOperator`; for an
  odd σ that flip is itself a verified symmetry and the dead unit its fixed point).
* duplicated unit (unit j ← unit i's incoming weights, each with half of i's outgoing weights w_o: the
  same function as unit i alone, fixed by the swap P): H maps the antisymmetric space (Δ on i, −Δ on
  j) to itself, and in its orthonormal basis (e_i − e_j)/√2 the block is [[M/2, B'ᵀ], [B', 0]] with
  M = Σ_t ⟨δ_t, w_o⟩ s2_t x̃_t x̃_tᵀ and B' = Σ_t δ_t (s_t x̃_t)ᵀ. Derivation: the two units' summed output
  changes by w_o σ''(z)Δz²/2 + 2 Δb σ'(z) Δz + O(Δ³) (its first order cancels), so the loss changes by
  ⟨δ, that⟩ + O(Δ⁴) and the Gauss–Newton terms of the two units cancel in the antisymmetric
  combination. λ_min < 0 makes the merged state a saddle in the split direction (Fukumizu–Amari,
  Şimşek 2021); for ReLU σ'' = 0 and the block is [[0, B'ᵀ], [B', 0]] again.
* weight decay: coupled L2 γ adds γI to every block, so the point is stable in these directions iff
  γ > γ* = −λ_min (for the dead unit γ* = σ_1(B), Ziyin 2024). Lanczos on H + γI has the same Krylov
  space and Ritz values shifted by exactly γ, so λ_min(H_sub + γI) = λ_min(H_sub) + γ costs no product.

B and M come from one forward and backward with hooks (δ, x, z, and the activation's own derivatives),
never from H; the measurement is Lanczos on the restricted HVP operator. The negative controls evaluate
the same formulas and the same Lanczos at the untouched trained units: off the fixed point the diagonal
blocks (Gauss–Newton, ⟨δ, w_out⟩σ'') and the coupling to the rest of the network are back, so the
statements fail by an amount of the block's own curvature.

Tolerances (`rounding_model`'s γ_n(u), n = 2d + inputs + outputs): an eigenvalue comparison allows
(i) the Lanczos bound of that Ritz value (min(r, r²/gap) when converged, the true residual r when not),
(ii) the HVP's rounding, 4γ_n(κ + |λ|) with κ = ‖H_sub u‖ for a random unit u of the subspace (Weyl: an
eigenvalue moves by at most the operator's error), and (iii) the first-order matrix's own rounding,
‖ΔK‖_F ≤ γ_n·‖(|B|-terms, |M|-terms)‖_F from the same sums taken in absolute value. The invariance ratio
allows 4γ_n(‖Hv‖ + κ‖v‖)/‖Hv‖ (the I2 bound of flat_directions); every Lanczos product is such a probe
(its first vector is random, the others H-polynomials of it; the statement is for every v in the space),
so invariance costs no HVP of its own. A product that is itself 0 to rounding tests nothing and is left
out (a ReLU dead unit's block is exactly 0).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from eqlab.analyses.curvature.functional import forward, named_params
from eqlab.analyses.curvature.lanczos import lanczos
from eqlab.analyses.curvature.operator import HessianOperator, analysis_copy
from eqlab.analyses.curvature.subspace import EigenspaceOperator
from eqlab.analyses.identities import PASSES, rounding_model, unit_roundoff
from eqlab.analyses.transforms import Permutation, SignFlip

VERDICTS = ("holds", "violated", "inconclusive")
_TINY = 1e-300  # division guard only, never a tolerance


# ------------------------------------------------------------------------------------------ unit groups
def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")  # transformers.pytorch_utils.Conv1D: x @ W + b


def _out_axis(m):
    """The weight axis indexed by the module's output features (None: not a per-feature linear map)."""
    return 0 if isinstance(m, nn.Linear) else (1 if _is_conv1d(m) else None)


def _in_axis(m):
    return 1 if isinstance(m, nn.Linear) else (0 if _is_conv1d(m) else None)


@dataclass
class UnitGroup:
    """Hidden units between a per-feature linear producer and linear consumers (read directly)."""

    name: str                       # the verified permutation this group comes from
    family: str
    producer: str                   # module names
    consumers: list
    incoming: list                  # [(param, unit axis)]: producer weight, then its bias (if any)
    outgoing: list                  # [(param, unit axis)] per consumer weight
    pair: tuple                     # the two units the permutation swaps
    n_units: int
    bias: bool

    @property
    def slices(self) -> list:
        return self.incoming + self.outgoing

    @property
    def params(self) -> list:
        return [p for p, _ in self.slices]


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def unit_groups(model, transformations) -> tuple[list, list]:
    """(groups, skipped): a `UnitGroup` per verified unit `Permutation` between linear maps, and
    (name, reason) for the permutations that are not of that shape."""
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    groups, skipped = [], []
    for t in transformations:
        if not isinstance(t, Permutation) or t.family != "permutation":
            continue
        moved = [sorted(k for k, v in enumerate(perm) if v != k) for _, _, perm in t.terms]
        if any(len(m) != 2 for m in moved) or len({tuple(m) for m in moved}) != 1:
            skipped.append((t.name, "a unit is read at several input positions (pooling or a flatten): "
                                    "its outgoing weight is not one vector per token"))
            continue
        i, j = moved[0]
        prod_w = t.terms[0][0]
        producer = _module_of(prod_w)
        pm = mods.get(producer)
        if pm is None or _out_axis(pm) is None or t.terms[0][1] != _out_axis(pm) or prod_w != f"{producer}.weight":
            skipped.append((t.name, f"the producer {producer} is not an nn.Linear / Conv1D read at its output "
                                    "features (a BatchNorm or convolution channel)"))
            continue
        incoming, outgoing, consumers, ok = [(prod_w, t.terms[0][1])], [], [], True
        for p, axis, _ in t.terms[1:]:
            if p == f"{producer}.bias":
                incoming.append((p, 0))
                continue
            cm = mods.get(_module_of(p))
            if cm is None or p != f"{_module_of(p)}.weight" or _in_axis(cm) != axis:
                ok = False
                break
            consumers.append(_module_of(p))
            outgoing.append((p, axis))
        if not ok or not outgoing:
            skipped.append((t.name, "a slice is neither the producer's nor a linear consumer's weight"))
            continue
        groups.append(UnitGroup(t.name, t.family, producer, consumers, incoming, outgoing, (i, j),
                                params[prod_w].shape[t.terms[0][1]], len(incoming) == 2))
    return groups, skipped


def unit_flip(group: UnitGroup, k: int) -> SignFlip:
    """The sign flip of unit k's slices: its −1 space is exactly unit k's coordinates."""
    return SignFlip(f"{group.name}:unit({k})", "unit_subspace", [[p, a, [k]] for p, a in group.slices])


def unit_swap(group: UnitGroup, i: int, j: int, like: dict) -> Permutation:
    """The swap of units i and j on every slice of the group (the verified permutation for its own pair)."""
    terms = []
    for p, a in group.slices:
        perm = list(range(like[p].shape[a]))
        perm[i], perm[j] = j, i
        terms.append([p, a, perm])
    return Permutation(f"{group.name}:swap({i}<->{j})", "permutation", terms)


def _slice(t: Tensor, axis: int, k: int) -> Tensor:
    return t.select(axis, k)


def with_unit_values(model, group: UnitGroup, values: dict):
    """A deep copy of ``model`` with unit slices replaced: values[(param, k)] = tensor for that slice."""
    m = copy.deepcopy(model)
    ps = dict(m.named_parameters())
    axes = dict(group.slices)
    with torch.no_grad():
        for (p, k), v in values.items():
            _slice(ps[p], axes[p], k).copy_(v)
    return m


def dead_unit(model, group: UnitGroup, k: int):
    """Unit k's incoming weights, bias and outgoing weights set to 0 (a copy)."""
    ps = dict(model.named_parameters())
    return with_unit_values(model, group, {(p, k): torch.zeros_like(_slice(ps[p].detach(), a, k))
                                           for p, a in group.slices})


def duplicate_unit(model, group: UnitGroup, i: int, j: int):
    """Unit j ← unit i's incoming weights and bias; both get ½ of unit i's outgoing weights (a copy). The
    function is the network with unit j removed, and the swap i <-> j fixes θ exactly: ½·w is computed once
    and written to both units, so the two slices are equal bit for bit."""
    ps = {n: p.detach() for n, p in model.named_parameters()}
    vals = {}
    for p, a in group.incoming:
        vals[(p, j)] = _slice(ps[p], a, i).clone()
    for p, a in group.outgoing:
        half = 0.5 * _slice(ps[p], a, i)
        vals[(p, i)], vals[(p, j)] = half, half.clone()
    return with_unit_values(model, group, vals)


# ------------------------------------------------------------------------------- first-order prediction
@dataclass
class FirstOrderBlock:
    """The predicted block K = [[c·M, Bᵀ], [B, 0]] from one forward + backward (no Hessian)."""

    B: Tensor                 # (Σ consumer outputs) × (d_in + bias)
    M: Tensor                 # (d_in + bias) × (d_in + bias)
    c: float                  # M's weight in K (0: dead unit, ½: antisymmetric split of a duplicate)
    rounding: float           # bound on ‖K_computed − K_exact‖_F
    slope_at_zero: float      # σ'(z) at the first token (σ'(0) at a dead unit)
    activation_at_unit: float  # max |σ(z)| over tokens (0 at a dead unit: needs σ(0) = 0)

    @property
    def matrix(self) -> Tensor:
        n_in, n_out = self.B.shape[1], self.B.shape[0]
        K = torch.zeros(n_in + n_out, n_in + n_out, dtype=torch.float64)
        K[:n_in, :n_in] = self.c * self.M
        K[n_in:, :n_in] = self.B
        K[:n_in, n_in:] = self.B.T
        return K

    @property
    def eigenvalues(self) -> Tensor:
        """Ascending; the dead unit's (c = 0) are exactly {±σ_j(B)} ∪ {0} by the SVD of B."""
        if self.c == 0.0:
            s = torch.linalg.svdvals(self.B)
            zeros = torch.zeros(sum(self.B.shape) - 2 * len(s), dtype=torch.float64)
            return torch.cat([-s, s, zeros]).sort().values
        return torch.linalg.eigvalsh(self.matrix)


def unit_first_order(model, loss, batch, group: UnitGroup, k: int, c: float,
                     w_out: dict | None = None, gamma_n: float | None = None) -> FirstOrderBlock:
    """B = Σ_t δ_t (σ'(z_t) x̃_t)ᵀ and M = Σ_t ⟨δ_t, w_o⟩ σ''(z_t) x̃_t x̃_tᵀ for unit k at the model's θ.

    ``w_out``: {consumer param: outgoing vector w_o} (default: unit k's own outgoing weights); ``gamma_n``:
    the relative rounding of one pass (default: the rounding model's γ_n at this θ)."""
    m = analysis_copy(model)
    mods = dict(m.named_modules())
    seen = {"x": [], "z": [], "a": [], "out": []}

    def take_x(mod, args, kwargs):
        seen["x"].append(args[0] if args else next(iter(kwargs.values())))

    hooks = [mods[group.producer].register_forward_pre_hook(take_x, with_kwargs=True)]

    def take_z(mod, args, out):
        z = out.detach().requires_grad_(True)  # a leaf: δ and σ' are derivatives of what depends on it
        seen["z"].append(z)
        return z

    hooks.append(mods[group.producer].register_forward_hook(take_z))
    for cname in group.consumers:
        hooks.append(mods[cname].register_forward_pre_hook(
            lambda mod, args, kwargs: seen["a"].append(args[0] if args else next(iter(kwargs.values()))),
            with_kwargs=True))
        hooks.append(mods[cname].register_forward_hook(lambda mod, args, out: seen["out"].append(out)))
    try:
        inputs, targets = batch
        with torch.enable_grad():
            value = loss(forward(m, named_params(m), inputs), targets)
    finally:
        for h in hooks:
            h.remove()
    if len(seen["x"]) != 1 or len(seen["out"]) != len(group.consumers):
        raise ValueError(f"{group.name}: the producer or a consumer is called more than once per forward")
    x, z, a = seen["x"][0].detach(), seen["z"][0], seen["a"][0]
    deltas = torch.autograd.grad(value, seen["out"], retain_graph=True)
    # σ'(z) and σ''(z) of the unit, elementwise, by autograd through the activation alone
    (ds,) = torch.autograd.grad(a[..., k].sum(), z, create_graph=True)
    s = ds[..., k]
    if s.requires_grad:
        (d2,) = torch.autograd.grad(s.sum(), z, allow_unused=True)
        s2 = torch.zeros_like(s) if d2 is None else d2[..., k]
    else:  # σ' piecewise constant (ReLU): σ'' = 0
        s2 = torch.zeros_like(s)
    s, s2 = s.detach().reshape(-1), s2.detach().reshape(-1)
    xt = x.reshape(-1, x.shape[-1]).double()
    if group.bias:
        xt = torch.cat([xt, torch.ones_like(xt[:, :1])], 1)
    ps = {n: p.detach() for n, p in m.named_parameters()}
    axes = dict(group.outgoing)
    if w_out is None:
        w_out = {p: _slice(ps[p], axes[p], k) for p, _ in group.outgoing}
    D = [d.detach().reshape(-1, d.shape[-1]).double() for d in deltas]
    if any(d.shape[0] != xt.shape[0] for d in D):
        raise ValueError(f"{group.name}: tokens of the producer and a consumer do not match")
    sx = s[:, None] * xt
    B = torch.cat([d.T @ sx for d in D])
    Dw = sum(d @ w_out[p].double() for d, (p, _) in zip(D, group.outgoing))
    M = xt.T @ ((Dw * s2)[:, None] * xt)
    # rounding of K: each entry is a sum over tokens of a product of two computed factors (δ from a backward,
    # σ'x̃ or σ''x̃x̃ᵀ from the forward), each within relative γ_n, so |ΔK| ≤ 2γ_n·(the same sums in absolute
    # value) entrywise to first order; ‖ΔK‖_F counts B twice (B and Bᵀ) and M with its weight c
    g = rounding_model(model, loss, batch).gamma() if gamma_n is None else gamma_n
    Babs = torch.cat([d.abs().T @ sx.abs() for d in D])
    Dwabs = sum(d.abs() @ w_out[p].double().abs() for d, (p, _) in zip(D, group.outgoing))
    Mabs = xt.abs().T @ ((Dwabs * s2.abs())[:, None] * xt.abs())
    rounding = 2 * g * math.sqrt(2 * float(Babs.square().sum()) + c * c * float(Mabs.square().sum()))
    return FirstOrderBlock(B, M, float(c), rounding, float(s[0]), float(a[..., k].detach().abs().max()))


# ------------------------------------------------------------------------------------------ measurements
class _RecordingSubspace:
    """Eᵀ H E on the full-space operator, recording for every product the part of H E c that leaves the
    subspace: each Lanczos product is also a probe of the invariance statement, at no extra HVP."""

    def __init__(self, op: HessianOperator, transform, gamma_n: float, kappa: float):
        self.op, self.sub = op, EigenspaceOperator(op, transform, "antisymmetric")
        self.dim, self.gamma_n, self.kappa = self.sub.dim, gamma_n, kappa
        self.ratios, self.tolerances = [], []
        self.products = 0

    def matvec(self, c: Tensor) -> Tensor:
        cn = float(c.norm())
        self.products += 1
        hv = self.op.matvec(self.sub.embed(c))
        inside = self.sub.restrict(hv)
        hn = float(hv.norm())
        tol = PASSES[2] * self.gamma_n * (hn + self.kappa * cn)  # I2's bound on the product's rounding
        if hn > tol:  # a product that is itself rounding (a zero block) tests nothing
            sym = hv - self.sub.embed(inside)  # (I − Q)Hv, Q = E Eᵀ; E, Eᵀ exact up to ½ ulp of 1/√2
            self.ratios.append(float(sym.norm()) / hn)
            self.tolerances.append(tol / hn)
        return inside


@dataclass
class InvarianceCheck:
    """‖(I − Q)Hv‖/‖Hv‖ over the products v = E c (Q = E Eᵀ): 0 when H leaves the subspace invariant."""

    ratios: list
    tolerances: list
    products: int = 0  # all products, including those that were 0 to rounding (not counted as probes)

    @property
    def worst(self) -> int:
        return max(range(len(self.ratios)), key=lambda i: self.ratios[i] / max(self.tolerances[i], _TINY))

    @property
    def holds(self) -> bool:
        return all(r <= t for r, t in zip(self.ratios, self.tolerances))


@dataclass
class SpectrumCheck:
    """Extreme eigenvalues of H on a subspace (Lanczos) against the first-order block's."""

    measured: list            # top-k (largest first), then bottom-k (smallest first)
    predicted: list           # the same ranks of K
    tolerances: list
    residuals: list           # Lanczos true residuals of the Ritz vectors
    errors: list              # Lanczos eigenvalue bounds used
    converged: bool
    dim: int
    kappa: float
    n_hvp: int
    k: int
    scale: float              # max |predicted|: the size of the effect
    invariant: InvarianceCheck

    @property
    def misses(self) -> list:
        return [abs(a - b) for a, b in zip(self.measured, self.predicted)]

    @property
    def worst(self) -> int:
        return max(range(len(self.misses)), key=lambda i: self.misses[i] / max(self.tolerances[i], _TINY))

    @property
    def holds(self) -> bool:
        return all(m <= t for m, t in zip(self.misses, self.tolerances))

    @property
    def bottom(self) -> int:
        return self.k  # index of the smallest Ritz value


def subspace_spectrum(model, loss, batch, transform, block: FirstOrderBlock, top_k: int, max_iter: int,
                      seed: int, gamma_n: float) -> SpectrumCheck:
    """Lanczos (top and bottom ``top_k``) on Eᵀ H E, E the −1 space of ``transform``, vs eig(block); every
    product also measures ‖(I − Q)H E c‖ (full-space HVPs: the rest of the network must not be reached)."""
    op = HessianOperator(model, loss, batch, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    probe = _RecordingSubspace(op, transform, gamma_n, 0.0)
    u = torch.randn(probe.dim, generator=gen, dtype=torch.float64)
    kappa = float(op.matvec(probe.sub.embed(u / u.norm())).norm())  # ‖H E u‖, unit u: the rounding scale
    probe.kappa = kappa
    k = max(1, min(top_k, probe.dim // 2))
    res = lanczos(probe.matvec, probe.dim, k=k, which="both", max_iter=max(2 * k, min(max_iter, probe.dim)),
                  seed=seed, warn=False)
    ev = block.eigenvalues
    if len(ev) != probe.dim:
        raise ValueError(f"the first-order block has {len(ev)} coordinates, the subspace {probe.dim}")
    pred = [float(x) + 0.0 for x in ev.flip(0)[:k]] + [float(x) + 0.0 for x in ev[:k]]  # + 0.0: no −0
    meas = [float(x) for x in res.eigenvalues]
    errs, tols = [], []
    for i in range(len(meas)):
        e = res.errors[i] if res.converged[i] else res.residuals[i]
        errs.append(float(e))
        tols.append(float(e) + PASSES[2] * gamma_n * (kappa + abs(pred[i])) + block.rounding)
    return SpectrumCheck(meas, pred, tols, [float(r) for r in res.residuals], errs, all(res.converged), probe.dim,
                         kappa, op.n_hvp, k, float(ev.abs().max()), InvarianceCheck(probe.ratios, probe.tolerances, probe.products))


# ------------------------------------------------------------------------------------------------ points
@dataclass
class SaddlePoint:
    """One construction (or its control) on one unit group: what is compared and how it came out."""

    construction: str          # "dead_unit" | "duplicated_unit"
    group: UnitGroup
    units: tuple
    control: bool
    block: FirstOrderBlock
    spectrum: SpectrumCheck
    n_hvp: int
    notes: list = field(default_factory=list)

    @property
    def transformation(self) -> str:
        u = ",".join(map(str, self.units))
        return f"{self.group.name}:{self.construction}({u})" + (":trained" if self.control else "")

    @property
    def degenerate(self) -> bool:
        """The predicted block is 0 to its own tolerance (ReLU's σ'(0) = 0): nothing can be told apart."""
        return self.spectrum.scale <= max(self.spectrum.tolerances)


def saddle_points(model, loss, batch, group: UnitGroup, units: int = 1, top_k: int = 1, max_iter: int = 30,
                  seed: int = 0) -> list[SaddlePoint]:
    """For ``units`` dead units (0, 1, ...) and ``units`` duplicated pairs ((i, j) = the group's pair, then
    (2, 3), ...): the construction and its control at the untouched trained model."""
    gamma_n = rounding_model(model, loss, batch).gamma()
    ps = {n: p.detach() for n, p in model.named_parameters()}
    out = []
    for k in range(min(units, group.n_units)):
        flip = unit_flip(group, k)
        for control, point in ((False, dead_unit(model, group, k)), (True, model)):
            block = unit_first_order(point, loss, batch, group, k, 0.0, gamma_n=gamma_n)
            spec = subspace_spectrum(point, loss, batch, flip, block, top_k, max_iter, seed, gamma_n)
            notes = []
            if not control and block.activation_at_unit != 0.0:
                notes.append(f"sigma(0) = {block.activation_at_unit:.3g} != 0: the dead unit is not critical")
            out.append(SaddlePoint("dead_unit", group, (k,), control, block, spec, spec.n_hvp, notes))
    pairs = [group.pair] + [(a, a + 1) for a in range(0, group.n_units - 1, 2) if (a, a + 1) != tuple(group.pair)]
    for i, j in pairs[:units]:
        swap = unit_swap(group, i, j, ps)
        axes = dict(group.outgoing)
        for control, point in ((False, duplicate_unit(model, group, i, j)), (True, model)):
            pp = {n: p.detach() for n, p in point.named_parameters()}
            # the merged unit's total outgoing weight (at the control: the untouched pair's sum)
            w_tot = {p: _slice(pp[p], axes[p], i) + _slice(pp[p], axes[p], j) for p, _ in group.outgoing}
            block = unit_first_order(point, loss, batch, group, i, 0.5, w_out=w_tot, gamma_n=gamma_n)
            spec = subspace_spectrum(point, loss, batch, swap, block, top_k, max_iter, seed, gamma_n)
            out.append(SaddlePoint("duplicated_unit", group, (i, j), control, block, spec, spec.n_hvp))
    return out


def dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def rounding_reason(model, loss, batch) -> str:
    rd = rounding_model(model, loss, batch)
    low = f" + {rd.n_low_ops} ops in {rd.low}" if rd.n_low_ops else ""
    return f"gamma_n(u), n = {rd.n} (2d + inputs + outputs), u = {unit_roundoff(torch.float64):.1e}{low}"
