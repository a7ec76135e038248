"""`eqlab.hessian(model, loss, batch)`: the Python API against dense float64 truth, with its counters
checked against independent counts and its defaults against the one defaults table."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import eqlab
from eqlab.analyses.curvature import operator as operator_module
from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.defaults import for_dtype
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.slq import rademacher_probes
from eqlab.models import build_task, hf_tiny
from eqlab.pipeline.userfunc import UserModelError

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
torch.set_num_threads(1)  # small problems: extra threads only contend on the shared machine


def digits(dtype, n=64):
    task = build_task("digits_cnn", {"channels": [2, 4], "hidden": 8}, dtype=dtype)
    X, y = task.train
    return task.model, task.loss, (X[:n], y[:n])


def tiny_gpt2(dtype=F64):
    model, loss, batch = hf_tiny.gpt2(n_layer=1, n_head=2, n_embd=8, vocab=7, seq=4, n=8)
    return model.to(dtype), loss, batch


MODELS = {"digits_cnn": digits, "gpt2": tiny_gpt2}


def truth(model, loss, batches, names=None):
    """Dense float64 Hessian by an operator built apart from the one under test (plain double backward)."""
    op = HessianOperator(model, loss, batches, names=names, method="double_backward", dtype=F64)
    H = dense_hessian(op)
    return H, np.linalg.eigvalsh(H.numpy())


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    model, loss, batch = MODELS[request.param](F64)
    H, evals = truth(model, loss, batch)
    return request.param, model, loss, batch, H, evals


def residual_bound(theta, r, evals, exclude):
    """|θ − λ| for the eigenvalue λ = evals[exclude] nearest θ: r always; r²/δ (δ the distance from θ to
    the rest of the spectrum) once δ > r (Kato–Temple)."""
    rest = np.delete(evals, exclude)
    delta = float(np.min(np.abs(rest - theta)))
    return min(r, r * r / delta) if delta > r else r


def dense_rounding(evals, dim):
    # the dense matrix's columns are products with relative rounding ≈ dim·eps·‖H‖, and eigh is backward
    # stable (each eigenvalue within ≈ dim·eps·‖H‖₂): twice dim·eps·‖H‖₂ covers both
    return 2 * dim * EPS64 * float(np.abs(evals).max())


# -- import ------------------------------------------------------------------------------------------------
def test_import_eqlab_loads_no_torch_until_the_hessian_is_built():
    code = ("import sys, eqlab\n"
            "assert 'torch' not in sys.modules, 'import eqlab loaded torch'\n"
            "assert 'hessian' in dir(eqlab) and callable(eqlab.hessian)\n"
            "assert 'torch' not in sys.modules, 'eqlab.hessian loaded torch before it was called'\n"
            "import eqlab.analyses.curvature.api\n"
            "print('torch' in sys.modules)\n")  # negative control: the engine itself does load torch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    with pytest.raises(AttributeError):
        eqlab.no_such_name


# -- eigenvalues ------------------------------------------------------------------------------------------
def test_top_and_bottom_k_match_dense_truth_within_their_residual_bounds(case):
    name, model, loss, batch, _, evals = case
    H = eqlab.hessian(model, loss, batch)
    assert H.dtype == F64 and H.dim == len(evals)
    top, bottom = H.top_k(4), H.bottom_k(3)
    assert top.tol == for_dtype(F64).tol == bottom.tol  # the table's row, not a default of its own
    rounding = dense_rounding(evals, H.dim)
    for res, order in ((top, np.arange(len(evals))[::-1]), (bottom, np.arange(len(evals)))):
        assert all(res.converged), (name, res.converged)
        for i, (theta, r, err) in enumerate(zip(res.eigenvalues.tolist(), res.residuals, res.errors)):
            j = order[i]
            bound = residual_bound(theta, r, evals, j) + rounding
            assert abs(theta - evals[j]) <= bound, (name, i, theta, evals[j], bound)
            assert abs(theta - evals[j]) <= err + rounding  # the reported error bound holds
            # negative control: the same bound rejects the neighbouring eigenvalue (a skipped λ_i)
            assert abs(theta - evals[order[i + 1]]) > bound, (name, i)


def test_a_block_is_the_principal_submatrix_of_the_full_hessian():
    model, loss, batch = digits(F64)
    H_full, _ = truth(model, loss, batch)
    H = eqlab.hessian(model, loss, batch, block=r"^fc2\.")
    assert H.names == ["fc2.weight", "fc2.bias"] and H.dim == 90
    # fc2 is the last layer: its coordinates are the last 90 of the full space
    sub = np.linalg.eigvalsh(H_full[-90:, -90:].numpy())
    res = H.top_k(3)
    rounding = dense_rounding(sub, 90)
    for i, (theta, r) in enumerate(zip(res.eigenvalues.tolist(), res.residuals)):
        assert res.converged[i]
        assert abs(theta - sub[-1 - i]) <= residual_bound(theta, r, sub, len(sub) - 1 - i) + rounding
    with pytest.raises(ValueError, match="names or block"):
        eqlab.hessian(model, loss, batch, names=["fc2.bias"], block="fc2")


# -- density and trace ------------------------------------------------------------------------------------
def test_density_moments_are_the_gauss_rules_of_the_probes_and_estimate_the_spectral_moments(case):
    name, model, loss, batch, Hd, evals = case
    H = eqlab.hessian(model, loss, batch)
    row = for_dtype(F64)
    d = H.density()  # defaults: the table's steps × probes, probe after probe in this process
    assert len(d.alphas) == row.slq_probes and d.n_matvec == row.slq_probes * row.slq_steps
    assert d.path == "sequential" and "this process" in d.path_reason
    s = float(np.abs(evals).max())
    Hs = Hd / s
    steps, probes, seed = 12, 16, 3
    d = H.density(steps=steps, probes=probes, seed=seed)
    V = rademacher_probes(H.dim, probes, seed)
    quad = d.quadrature()
    degrees = range(0, 2 * steps)  # an m-node Gauss rule integrates degree ≤ 2m − 1 exactly
    per_probe = np.zeros((probes, len(degrees)))
    for p, (nodes, weights) in enumerate(quad):
        u = V[:, p] / V[:, p].norm()
        Hju = u.clone()
        for j in degrees:
            exact = float(u @ Hju)
            per_probe[p, j] = np.sum(weights * (nodes / s) ** j)
            # scaled moments are ≤ 1; each of the j products and m Lanczos steps adds ≈ dim·eps
            assert abs(per_probe[p, j] - exact) <= (j + steps) * H.dim * EPS64, (name, p, j)
            Hju = Hs @ Hju
    # pooled: an unbiased estimate of tr(H^j)/dim; its error estimate is the spread over probes
    for j in range(1, 8):
        target = float(np.mean((evals / s) ** j))
        se = per_probe[:, j].std(ddof=1) / np.sqrt(probes)
        assert abs(per_probe[:, j].mean() - target) <= 4 * se + 2 * (j + steps) * H.dim * EPS64, (name, j)
    # negative control: a 3-node rule is exact to degree 5, not 6 (its error there is (β₁β₂β₃)², scaled)
    short = H.density(steps=3, probes=1, seed=seed)
    (nodes, weights), = short.quadrature()
    u = V[:, 0] / V[:, 0].norm()
    for j, exact in ((5, True), (6, False)):
        err = abs(np.sum(weights * (nodes / s) ** j) - float(u @ torch.linalg.matrix_power(Hs, j) @ u))
        assert (err <= (j + 3) * H.dim * EPS64) == exact, (name, j, err)


def test_trace_is_within_the_hutchpp_spread_of_the_dense_trace(case):
    name, model, loss, batch, _, evals = case
    H = eqlab.hessian(model, loss, batch)
    t = H.trace()
    assert t.n_matvec == for_dtype(F64).trace_matvecs and t.path == "sequential"  # in process: one by one
    # the exact part tr(QᵀHQ) carries ≈ dim·eps·Σ|λ| of rounding; the rest is the Monte-Carlo spread
    assert abs(t.estimate - float(evals.sum())) <= 4 * t.std_error + H.dim * EPS64 * float(np.abs(evals).sum()), name


# -- counters ----------------------------------------------------------------------------------------------
def test_counters_equal_the_products_and_passes_actually_performed(monkeypatch):
    """Counted apart: every per-batch product column at the operator's lowest level, every first-order
    graph built, every gradient evaluated; two batches so each product spans both."""
    built, grads = [], []

    class CountedGraph(operator_module.CachedGraph):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    def counted_value_and_grad(*a, **kw):
        grads.append(1)
        return real_value_and_grad(*a, **kw)

    real_value_and_grad = operator_module.value_and_grad
    monkeypatch.setattr(operator_module, "CachedGraph", CountedGraph)
    monkeypatch.setattr(operator_module, "value_and_grad", counted_value_and_grad)
    model, loss, (X, y) = digits(F64)
    batches = [(X[:32], y[:32]), (X[32:], y[32:])]
    for method in ("auto", "double_backward"):
        built.clear(), grads.clear()
        H = eqlab.hessian(model, loss, batches, method=method)
        columns = []  # (batch, number of vectors) per low-level call
        real_flat, real_many = H.operator._hvp_flat, H.operator._hvps
        H.operator._hvp_flat = lambda i, x: columns.append(1) or real_flat(i, x)
        H.operator._hvps = lambda i, Vd: columns.append(next(iter(Vd.values())).shape[0]) or real_many(i, Vd)
        assert H.counts["forwards_setup"] == 2  # the contract check ran the model once per batch
        spent = [H.top_k(2).n_matvec, H.bottom_k(2).n_matvec, H.density(steps=6, probes=2).n_matvec,
                 H.trace(n_matvec=9).n_matvec]
        H.matvec(torch.ones(H.dim, dtype=F64))
        H.matmat(torch.ones(H.dim, 3, dtype=F64))
        H.gradient()
        H.check_deterministic()
        assert sum(columns) % 2 == 0  # every product covers both batches
        assert H.n_hvp == sum(columns) // 2 == sum(spent) + 1 + 3 + 2, method
        assert H.n_gradients == len(built) + len(grads), (method, H.counts, len(built), len(grads))
        if H.method == "double_backward_cached":
            # the trial graph, batch 1's graph, and both rebuilt by check_deterministic
            assert len(built) == 4 and H.counts["gradients_setup"] == 1
        else:
            assert len(built) == (1 if method == "auto" else 0)
        assert len(grads) == 3 * 2  # gradient() and check_deterministic's two, over two batches


# -- dtypes --------------------------------------------------------------------------------------------------
def test_a_float32_model_uses_the_float32_row_and_converges_to_the_float64_truth():
    model32, loss, (X, y) = digits(torch.float32)
    H = eqlab.hessian(model32, loss, (X, y))
    row = for_dtype(torch.float32)
    assert H.dtype == torch.float32 and H.defaults == row
    res = H.top_k(3)
    assert res.tol == row.tol and all(res.converged), res
    model64 = copy.deepcopy(model32).double()  # the same weights, exactly
    H64, evals = truth(model64, loss, (X.double(), y))
    # float32 products are the float64 Hessian plus a perturbation E; measured on the unit vectors
    # (a dense float32 Hessian) and doubled for general vectors, ‖E‖₂ bounds the shift of every
    # eigenvalue (Weyl) and of every residual
    H32 = dense_hessian(H.operator)
    pert = 2 * float(torch.linalg.matrix_norm(H32 - H64, ord=2))
    for i, (theta, r) in enumerate(zip(res.eigenvalues.tolist(), res.residuals)):
        assert abs(theta - evals[-1 - i]) <= r + pert + dense_rounding(evals, H.dim), (i, theta, evals[-1 - i])
    assert H.conv == "forward" and "float32" in H.conv_reason  # the recorded conv rule


# -- refusals ------------------------------------------------------------------------------------------------
def test_active_dropout_is_refused_and_the_eval_model_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    batch = (torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,)))
    with pytest.raises(ValueError, match="active dropout"):
        eqlab.hessian(model, nn.functional.cross_entropy, batch)
    H = eqlab.hessian(model.eval(), nn.functional.cross_entropy, batch)
    assert H.dim == 4 * 8 + 8 + 8 * 3 + 3


def test_a_contract_breach_is_one_line_naming_it():
    model, _, batch = digits(F64, n=8)
    with pytest.raises(UserModelError) as err:
        eqlab.hessian(model, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), batch)
    assert str(err.value) == "eqlab.hessian: loss returned a tensor of shape (8,), expected a scalar"
    with pytest.raises(UserModelError, match="batch 1: the batch is empty"):
        eqlab.hessian(model, nn.functional.cross_entropy, [batch, (batch[0][:0], batch[1][:0])])


def test_the_readme_python_api_example_runs_and_converges():
    """The README's "Python API" block, run as written (in a subprocess: a user's fresh interpreter)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code += "\nassert all(top.converged) and all(low.converged) and H.n_hvp == " \
            "top.n_matvec + low.n_matvec + rho.n_matvec + tr.n_matvec\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread on the shared machine; results do not depend on it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "double_backward_cached" in out.stdout


USER_FILE = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    return {"model": model, "batch": (torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))),
            "loss": nn.functional.cross_entropy}
'''


def test_the_api_and_eqlab_spectrum_are_one_contract_with_one_set_of_defaults(tmp_path):
    """The same FILE.py:FUNC through `eqlab spectrum` (compute_spectrum) and through eqlab.hessian: the
    same operator, defaults and seeds, so the same arithmetic and the same numbers."""
    from eqlab.pipeline.spectrum_cmd import compute_spectrum
    from eqlab.pipeline.userfunc import UserSource

    path = tmp_path / "mymodel.py"
    path.write_text(USER_FILE)
    ref = f"{path}:make"
    cli = compute_spectrum(ref, top=3, bottom=2, density=True, trace=True)
    model, loss, batches = UserSource(ref)(F64)
    H = eqlab.hessian(model, loss, batches)
    top, bottom, dens, tr = H.top_k(3), H.bottom_k(2), H.density(), H.trace()
    assert (cli["method"], cli["tol"], cli["max_iter"]) == (H.method, H.defaults.tol, H.defaults.max_iter)
    # identical products and recurrences: differences only from summation order, a few eps of max|θ|
    scale = 16 * EPS64 * max(abs(x) for x in cli["eigenvalues"] + cli["bottom_eigenvalues"])
    assert np.allclose(top.eigenvalues.numpy(), cli["eigenvalues"], rtol=0, atol=scale)
    assert np.allclose(bottom.eigenvalues.numpy(), cli["bottom_eigenvalues"], rtol=0, atol=scale)
    for key in ("alphas", "betas"):  # the CLI's density runs the same probes on the same path
        assert np.allclose(np.concatenate(getattr(dens, key)), np.concatenate(cli["density"][key]), rtol=0, atol=scale)
    assert (dens.n_matvec, tr.n_matvec) == (cli["density"]["hvps"], cli["trace"]["hvps"])
    assert abs(tr.estimate - cli["trace"]["estimate"]) <= H.dim * EPS64 * abs(tr.estimate) + scale
    assert H.n_hvp == cli["hvps"]
