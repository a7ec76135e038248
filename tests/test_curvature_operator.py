"""HessianOperator against dense float64 Hessians from `torch.func.hessian` of the flat loss."""
import copy

import pytest
import torch
from torch import nn

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.models import build_task

F64 = torch.float64
torch.set_num_threads(1)  # tiny problems: extra threads only contend on the shared 2-core machine
METHODS = ["double_backward", "forward_over_reverse"]


def tiny_cnn(activation="relu"):
    options = {"channels": (2, 4), "hidden": 8, "bn_eps": 1e-12, "activation": activation}
    task = build_task("digits_cnn", options, dtype=F64)
    X, y = task.train
    return task.model, task.loss, (X[:48], y[:48])


def tiny_gpt2(activation="relu"):
    task = build_task("modadd_gpt2", {"p": 5, "n_embd": 8, "n_head": 2, "activation": activation}, dtype=F64)
    return task.model, task.loss, task.train


class WithUnused(nn.Module):
    """An MLP with a parameter the loss never touches (its Hessian rows must be exactly zero)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_with_unused():
    torch.manual_seed(0)
    X = torch.randn(37, 5, dtype=F64)
    y = torch.randint(0, 3, (37,))
    return WithUnused().to(F64), nn.functional.cross_entropy, (X, y)


def reference_hessian(model, loss, batches, names=None):
    """Dense Hessian of Σ n_b L_b / N, written independently of the operator.

    `torch.autograd.functional.hessian` (a plain loop of double backwards), *not* `torch.func.hessian`:
    on torch 2.13 `torch.func.hessian` (= jacfwd(jacrev)) and jacrev(jacrev) are wrong on normalisation
    layers — ~20% off on a lone train-mode BatchNorm1d and ~1e-2 relative in the LayerNorm-weight rows
    of the tiny GPT-2, against finite differences (cf. pytorch#196699) — while jvp(grad),
    jacrev(grad), jacfwd(grad) and double backward agree with finite differences to 1e-9.
    `test_reference_against_fd` checks the reference itself.
    """
    model = copy.deepcopy(model)
    for m in model.modules():  # train-mode BN: batch statistics, without the running-stat side effect
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    space = ParamSpace(model, names)
    N = sum(len(y) for _, y in batches)

    def f(theta):
        ps = space.unflatten(theta)
        return sum(len(y) * loss(torch.func.functional_call(model, ps, (X,), strict=False), y)
                   for X, y in batches) / N

    return torch.autograd.functional.hessian(f, space.values(model).clone())


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [lambda: tiny_cnn("tanh"), lambda: tiny_gpt2("gelu")], ids=["cnn", "gpt2"])
def test_reference_against_fd(make):
    """The reference is right: central differences of the gradient along random directions.

    Smooth activations, because with ReLU many pre-activations share a value (zero-padded borders,
    repeated tokens), so a step of 1e-5 crosses kinks and finite differences mean nothing there.
    """
    model, loss, (X, y) = make()
    H = reference_hessian(model, loss, [(X, y)])
    op = HessianOperator(model, loss, (X, y), method="double_backward")
    space, theta = op.space, op.space.values(op.model)

    def grad(t):
        t = t.clone().requires_grad_(True)
        value = loss(torch.func.functional_call(op.model, space.unflatten(t), (X,), strict=False), y)
        return torch.autograd.grad(value, t)[0]

    v = torch.randn(space.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    h = 1e-5
    fd = (grad(theta + h * v) - grad(theta - h * v)) / (2 * h)
    assert rel(fd, H @ v) <= 1e-6


CASES = {"cnn_bn": tiny_cnn, "gpt2": tiny_gpt2, "unused": mlp_with_unused}


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, make in CASES.items():
        model, loss, batch = make()
        out[name] = (model, loss, batch, reference_hessian(model, loss, [batch]))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_matvec_and_matmat_match_dense(references, case, method):
    model, loss, batch, H = references[case]
    op = HessianOperator(model, loss, batch, method=method)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(op.dim, 3, generator=g, dtype=F64)
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10
    assert rel(op.matmat(V), H @ V) <= 1e-10
    assert op.n_hvp == 4
    if case == "unused":
        rows = op.space.slice("unused.weight").start, op.space.slice("unused.bias").stop
        assert torch.all(op.matvec(V[:, 1])[rows[0]:rows[1]] == 0)


def test_dense_hessian_from_operator(references):
    model, loss, batch, H = references["cnn_bn"]
    op = HessianOperator(model, loss, batch, method="double_backward")
    assert rel(dense_hessian(op), H) <= 1e-10


def test_auto_is_a_reproducible_rule_and_counts_its_setup(references):
    """``auto`` picks by a rule (no timing): the same method, reason and counts for identical cases, the
    setup work reported apart from ``n_hvp`` (no products, one first-order pass for the trial graph)."""
    model, loss, batch, H = references["gpt2"]
    ops = [HessianOperator(model, loss, batch) for _ in range(3)]
    assert {(op.method, op.method_reason, op.conv, op.conv_reason) for op in ops} == \
        {(ops[0].method, ops[0].method_reason, ops[0].conv, ops[0].conv_reason)}
    op = ops[0]
    assert op.method == "double_backward_cached" and op.method_reason.startswith("auto:")
    assert op.hvps_setup == 0 and op.gradients_setup == 1 and op.n_hvp == 0
    v = torch.randn(op.dim, dtype=F64)
    assert rel(op.matvec(v), H @ v) <= 1e-10 and op.n_hvp == 1
    given = HessianOperator(model, loss, batch, method="double_backward")
    assert given.method_reason == "given" and given.gradients_setup == 0 and given.hvps_setup == 0


def test_bn_model_loss_is_train_mode_loss_and_model_untouched():
    model, loss, (X, y) = tiny_cnn()
    before = {k: b.clone() for k, b in model.state_dict().items()}
    op = HessianOperator(model, loss, (X, y), method="forward_over_reverse")
    op.matvec(torch.randn(op.dim, dtype=F64))
    op.check_deterministic()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # buffers and weights unchanged
    expected = loss(copy.deepcopy(model).train()(X), y).item()  # train mode = batch statistics
    assert op.loss() == pytest.approx(expected, rel=1e-13)


def test_batch_list_equals_concatenation():
    model, loss, (X, y) = tiny_gpt2()
    cuts = [0, 2, 9, len(y)]  # unequal batches
    parts = [(X[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
    whole = HessianOperator(model, loss, (X, y), method="double_backward")
    split = HessianOperator(model, loss, parts, method="forward_over_reverse")
    v = torch.randn(whole.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert rel(split.matvec(v), whole.matvec(v)) <= 1e-12
    s, n = split.sum_matvec(v)
    assert n == len(y) and s.dtype == F64
    assert rel(s / n, split.matvec(v)) <= 1e-15
    gs, n, ls = split.sum_gradient()
    assert rel(gs / n, whole.gradient()) <= 1e-12
    assert ls / n == pytest.approx(whole.loss(), rel=1e-13)
    H = reference_hessian(model, loss, parts)
    assert rel(split.matvec(v), H @ v) <= 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_block_restriction_is_dense_sub_block(references, method):
    model, loss, batch, H = references["gpt2"]
    block = ParamSpace.matching(model, r"h\.0\.attn")
    op = HessianOperator(model, loss, batch, names=block, method=method)
    full = ParamSpace(model)
    idx = torch.cat([torch.arange(full.slice(n).start, full.slice(n).stop) for n in block.names])
    v = torch.randn(block.dim, dtype=F64)
    assert rel(op.matvec(v), H[idx][:, idx] @ v) <= 1e-10
    sub = HessianOperator(model, loss, batch, names=["lm_head.weight"], method=method)
    assert sub.dim == full.numels["lm_head.weight"]


def test_dtype_conversion_and_float32_interface(references):
    model, loss, batch, H = references["gpt2"]
    op = HessianOperator(model.float(), loss, batch, method="double_backward", dtype=F64)
    assert op.dtype == F64 and next(model.parameters()).dtype == torch.float32
    op32 = HessianOperator(model, loss, batch, method="double_backward")
    v = torch.randn(op.dim, dtype=F64)
    out32 = op32.matvec(v.float())
    assert out32.dtype == torch.float32
    assert rel(op.matvec(v), out32.double()) <= 1e-4  # float32 round-off, float64 model reference
    model.double()


def test_to_scipy(references):
    import numpy as np
    model, loss, batch, H = references["unused"]
    A = HessianOperator(model, loss, batch).to_scipy()
    x = np.random.default_rng(0).standard_normal((A.shape[0], 2))
    assert np.allclose(A @ x, H.numpy() @ x, rtol=1e-10, atol=1e-12)
    assert np.allclose(A.matvec(x[:, 0]), H.numpy() @ x[:, 0], rtol=1e-10, atol=1e-12)


def test_active_dropout_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)).to(F64)
    batch = (torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="dropout"):
        HessianOperator(model, nn.functional.cross_entropy, batch)
    HessianOperator(model.eval(), nn.functional.cross_entropy, batch)  # eval mode: dropout is off


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x + 0.1 * torch.randn_like(x))


def test_nondeterministic_model_is_caught():
    batch = (torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,)))
    op = HessianOperator(Noisy().to(F64), nn.functional.cross_entropy, batch, method="double_backward")
    with pytest.raises(RuntimeError, match="not deterministic"):
        op.check_deterministic()


def test_bad_inputs():
    model, loss, batch = mlp_with_unused()
    with pytest.raises(ValueError, match="matches no"):
        ParamSpace.matching(model, r"^conv")
    with pytest.raises(KeyError):
        HessianOperator(model, loss, batch, names=["nope"])
    with pytest.raises(ValueError, match="method"):
        HessianOperator(model, loss, batch, method="fd")
    op = HessianOperator(model, loss, batch, method="double_backward")
    with pytest.raises(ValueError):
        op.matvec(torch.zeros(op.dim + 1, dtype=F64))


def test_compiled_method_matches_dense_and_is_never_auto():
    """The opt-in torch.compile'd forward-over-reverse HVP is the same Hessian (float64, dense truth),
    with exact zero rows for a parameter the loss never touches; ``auto`` never compiles (tens of
    seconds); forward convs are refused with it. The MLP, not the GPT-2: compiling costs ~25 s for it
    against ~90 s for the 1-layer GPT-2 on 2 cores."""
    model, loss, (X, y) = mlp_with_unused()
    batches = [(X, y)]  # one batch: each batch is compiled on its own; weighting is tested above
    H = reference_hessian(model, loss, batches)
    op = HessianOperator(model, loss, batches, method="compiled")
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    # float64 products of O(10) terms per entry: rounding ≈ 1e-15 relative, 1e-10 leaves room for any BLAS
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10
    assert rel(op.matmat(V), H @ V) <= 1e-10 and op.n_hvp == 3
    unused = ParamSpace(model, ["unused.weight", "unused.bias"]).dim
    assert torch.equal(op.matvec(torch.ones(op.dim, dtype=F64))[-unused:], torch.zeros(unused, dtype=F64))
    assert HessianOperator(model, loss, batches).method != "compiled"
    with pytest.raises(ValueError, match="forward-mode"):
        HessianOperator(model, loss, batches, method="compiled", conv="forward")
