"""Findings 6 (saddles at dead and duplicated units): the first-order blocks and the Lanczos spectra against
a dense float64 oracle of the unit's Hessian columns (H E by an independent plain double-backward operator,
E built here from the unit's slices), on a GELU GPT-2 and a tanh / ReLU digits CNN; the controls at the
untouched trained units; the weight-decay threshold; and the rows the stage writes."""
import math

import pytest
import torch

from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.discover import discover
from eqlab.analyses.predictions.discrete_saddles import (dead_unit, duplicate_unit, saddle_points,
                                                          unit_first_order, unit_groups)
from eqlab.models import build_task, hf_tiny
from eqlab.pipeline import findings_discrete
from eqlab.pipeline.schema import TABLES
from eqlab.pipeline.study import RunSpec

F64 = torch.float64
torch.set_num_threads(1)  # small problems: extra threads only contend on the shared machine


def _adam(model, loss, batch, steps=20, lr=1e-2):
    """A few full-batch Adam steps: off the initialisation, so the trained units are generic."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    inputs, targets = batch
    for _ in range(steps):
        opt.zero_grad()
        loss(model(inputs), targets).backward()
        opt.step()
    return model


def _gpt2():
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=2, n_embd=8, vocab=7, seq=4, n=8, activation="gelu_new")
    return _adam(model.to(F64), loss, batch), loss, batch


def _cnn(activation):
    task = build_task("digits_cnn", {"channels": [1, 2], "hidden": 6, "bn_eps": 1e-20, "activation": activation},
                      dtype=F64)
    task.model.train()
    X, y = task.train
    batch = (X[:32], y[:32])
    return _adam(task.model, task.loss, batch), task.loss, batch


def _group(model, loss, batch):
    verified = [f.transformation for f in discover(model, loss, batch).found if f.verified]
    groups, skipped = unit_groups(model, verified)
    return verified, groups, skipped


def _unit_index(space, group, k):
    """Flat indices of unit k's coordinates, in slice order (producer weight, bias, consumer weights)."""
    out = []
    for p, axis in group.slices:
        idx = torch.arange(space.numels[p]).reshape(space.shapes[p]).select(axis, k).reshape(-1)
        out.append(idx + space.offsets[p])
    return torch.cat(out)


def _oracle(model, loss, batch, group, units):
    """(E, H E, EᵀHE) with E the unit's coordinates (one unit) or the antisymmetric pair basis (two)."""
    op = HessianOperator(model, loss, batch, method="double_backward", dtype=F64, conv="native")
    space = ParamSpace(model)
    idx = [_unit_index(space, group, k) for k in units]
    E = torch.zeros(space.dim, len(idx[0]), dtype=F64)
    cols = torch.arange(len(idx[0]))
    if len(units) == 1:
        E[idx[0], cols] = 1.0
    else:
        E[idx[0], cols], E[idx[1], cols] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    HE = op.matmat(E)
    return E, HE, E.T @ HE


def _point(model, group, p):
    if p.control:
        return model
    return dead_unit(model, group, p.units[0]) if p.construction == "dead_unit" else \
        duplicate_unit(model, group, *p.units)


@pytest.fixture(scope="module", params=["gpt2_gelu", "cnn_tanh"])
def case(request):
    model, loss, batch = _gpt2() if request.param == "gpt2_gelu" else _cnn("tanh")
    _, groups, skipped = _group(model, loss, batch)
    assert len(groups) == 1, (groups, skipped)
    g = groups[0]
    points = saddle_points(model, loss, batch, g, units=1, top_k=2, max_iter=40, seed=1)
    oracles = [_oracle(_point(model, g, p), loss, batch, g, p.units) for p in points]
    return request.param, model, loss, batch, g, points, oracles


def test_constructions_match_the_dense_oracle_and_controls_miss_it(case):
    name, model, loss, batch, g, points, oracles = case
    assert [(p.construction, p.control) for p in points] == [("dead_unit", False), ("dead_unit", True),
                                                             ("duplicated_unit", False), ("duplicated_unit", True)]
    for p, (E, HE, block) in zip(points, oracles):
        s = p.spectrum
        dense = torch.linalg.eigvalsh(block)
        # (1) Lanczos against the dense block, always (construction or control): the stated bound covers it
        truth = dense.flip(0)[:s.k].tolist() + dense[:s.k].tolist()
        for m, t, tol in zip(s.measured, truth, s.tolerances):
            assert abs(m - t) <= tol, (name, p.transformation, m, t, tol)
        # (2) the first-order block against the dense one, every entry and every eigenvalue
        K = p.block.matrix
        gap = float((dense - p.block.eigenvalues).abs().max())
        off = float(((HE - E @ block).norm() / HE.norm()))  # (I − EEᵀ)HE: the coupling to the rest
        if not p.control:
            assert float((block - K).abs().max()) <= max(s.tolerances), (name, p.transformation)
            assert gap <= max(s.tolerances), (name, p.transformation, gap)
            assert off <= p.spectrum.invariant.tolerances[p.spectrum.invariant.worst], (name, off)
            assert s.holds and p.spectrum.invariant.holds
        else:
            # off the fixed point the diagonal blocks and the coupling are back: a miss of the block's own size
            assert gap > 1e6 * max(s.tolerances) and gap > 1e-3 * s.scale, (name, p.transformation, gap)
            assert off > 0.1, (name, off)
            assert not s.holds and not p.spectrum.invariant.holds
        assert not p.degenerate


def test_dead_unit_block_is_the_outer_product_B_and_its_spectrum_plus_minus_sigma(case):
    name, model, loss, batch, g, points, oracles = case
    p, (E, HE, block) = points[0], oracles[0]
    n_in = p.block.B.shape[1]
    tol = max(p.spectrum.tolerances)
    # E is ordered (w_in, b, w_out) like B's columns and rows: the dense off-diagonal block is B itself
    assert float((block[n_in:, :n_in] - p.block.B).abs().max()) <= tol, name
    assert float(block[:n_in, :n_in].abs().max()) <= tol and float(block[n_in:, n_in:].abs().max()) <= tol
    sv = torch.linalg.svdvals(p.block.B)
    dense = torch.linalg.eigvalsh(block)
    zeros = dense.numel() - 2 * sv.numel()
    assert torch.allclose(dense, torch.cat([-sv, sv, torch.zeros(zeros, dtype=F64)]).sort().values, rtol=0, atol=tol)
    assert p.block.activation_at_unit == 0.0 and p.block.slope_at_zero > 0.4  # σ(0) = 0, σ'(0) = 1 or ½
    assert sv[0] > 1e6 * tol  # a real saddle, far above rounding


def test_weight_decay_threshold_on_the_dense_block(case):
    name, model, loss, batch, g, points, oracles = case
    for p, (E, HE, block) in zip(points, oracles):
        if p.control:
            continue
        wd = next(r for r in findings_discrete._rows_of(p, "float64", "gamma_n") if r["finding"].endswith("wd_threshold"))
        assert wd["verdict"] == "holds", (name, wd)
        gstar, tol = wd["predicted"], wd["tolerance"]
        delta = 2 * tol / gstar
        eye = torch.eye(block.shape[0], dtype=F64)
        # the L2 objective's block is H_ii + γI: unstable just below γ*, stable just above
        lo = float(torch.linalg.eigvalsh(block + gstar * (1 - delta) * eye)[0])
        hi = float(torch.linalg.eigvalsh(block + gstar * (1 + delta) * eye)[0])
        assert lo < 0 < hi, (name, p.transformation, lo, hi)
        assert abs(wd["eigenvalue"] - hi) <= tol  # the row's λ_min(H_sub + γ₊I), from Lanczos + γ₊


def test_rows_fit_the_schema_and_carry_the_verdicts(case):
    name, model, loss, batch, g, points, oracles = case
    rows = [r for p in points for r in findings_discrete._rows_of(p, "float64", "gamma_n")]
    columns = set(TABLES["findings"].names)
    assert {f for r in rows for f in r} <= columns
    assert {r["finding"] for r in rows} == set(findings_discrete.ROW_FINDINGS)
    for r in rows:
        assert r["verdict"] == ("violated" if r["control"] else "holds"), (name, r["transformation"], r["finding"])
        assert math.isfinite(r["statistic"]) and r["tolerance"] > 0 and r["hvps"] > 0
        if r["control"]:
            assert r["residual"] > 1e6 * r["tolerance"], (r["finding"], r["residual"], r["tolerance"])


def test_relu_dead_unit_is_inconclusive_and_its_duplicate_still_decides():
    model, loss, batch = _cnn("relu")
    verified, groups, skipped = _group(model, loss, batch)
    # the conv channels pooled and flattened into fc1 are not single-vector units (bn1 has one channel: no swap)
    assert [n for n, _ in skipped] == ["permutation[bn2->fc1](0<->1)"] and "flatten" in skipped[0][1], skipped
    g = groups[0]
    block = unit_first_order(dead_unit(model, g, 0), loss, batch, g, 0, 0.0)
    assert block.slope_at_zero == 0.0 and torch.count_nonzero(block.B) == 0  # torch's ReLU'(0) = 0: B = 0
    spec = RunSpec("r", "digits_cnn", {}, "adam", 1e-2, 0.0, 0.0, 32, 20, (0,), 1, 0)
    rows = findings_discrete.discrete_saddle_rows(spec, model, loss, batch, verified, {})
    dead = [r for r in rows if "dead_unit" in r["transformation"] and not r["control"]]
    assert dead and {r["verdict"] for r in dead} == {"inconclusive"}
    dup = [r for r in rows if "duplicated_unit" in r["transformation"]]
    # ReLU's duplicate block [[0, B'ᵀ], [B', 0]] is not zero: it holds, and the control is violated
    assert {r["verdict"] for r in dup if not r["control"]} == {"holds"}
    assert {r["verdict"] for r in dup if r["control"]} == {"violated"}
    # cost per checkpoint on this CNN: under the findings stage's ~60-HVP budget plus the controls' share
    assert sum({r["transformation"]: r["hvps"] for r in rows}.values()) <= 4 * (findings_discrete.SETTINGS[
        "discrete_max_iter"] + 1)
