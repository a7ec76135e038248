"""The cached-graph HVP (`double_backward_cached`) against dense float64 Hessians, and its guards."""
import pytest
import torch
from torch import nn

from eqlab.analyses.curvature.cached import CachedGraph
from eqlab.analyses.curvature.operator import CACHED, HessianOperator
from test_curvature_operator import Noisy, mlp_with_unused, reference_hessian, rel, tiny_cnn, tiny_gpt2

F64 = torch.float64
torch.set_num_threads(1)


def two_batches(make):
    model, loss, (X, y) = make()
    h = len(y) // 2 + 1  # unequal halves: the example weighting matters
    return model, loss, [(X[:h], y[:h]), (X[h:], y[h:])]


@pytest.mark.parametrize("make", [tiny_cnn, tiny_gpt2, mlp_with_unused], ids=["cnn_bn_train", "gpt2_ln", "unused"])
def test_cached_matches_dense_over_several_batches(make):
    model, loss, batches = two_batches(make)
    H = reference_hessian(model, loss, batches)
    op = HessianOperator(model, loss, batches, method=CACHED)
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    for _ in range(2):  # the graph is reused: the second round must be as exact as the first
        assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10
        assert rel(op.matmat(V), H @ V) <= 1e-10
    assert op.matmat_mode == "batched" and op.n_hvp == 10
    assert op.cache_bytes > 0 and op.cache_rebuilds == 0
    loop = HessianOperator(model, loss, batches, method=CACHED)
    loop.matmat_mode = "loop"  # the fallback path for models whose backward cannot be vmapped
    assert rel(loop.matmat(V), H @ V) <= 1e-10
    if make is mlp_with_unused:
        s = op.space.slice("unused.weight")
        assert torch.all(op.matvec(V[:, 1])[s] == 0)


def test_in_place_change_of_a_buffer_rebuilds_the_graph():
    """Eval-mode BatchNorm reads running statistics: changing them must not leave a stale graph."""
    model, loss, batch = tiny_cnn()
    model.eval()
    op = HessianOperator(model, loss, batch, method=CACHED)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    before = op.matvec(v)
    bn = next(m for m in op.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    bn.running_var.mul_(2.0)
    after = op.matvec(v)
    fresh = HessianOperator(op.model, loss, batch, names=op.space.names, method="double_backward").matvec(v)
    assert op.cache_rebuilds == 1
    assert rel(after, fresh) <= 1e-12 and rel(after, before) > 1e-3
    with torch.no_grad():  # a parameter changed in place (e.g. load_state_dict) as well
        op.params[op.space.names[0]].add_(0.1)
    fresh = HessianOperator(op.model, loss, batch, names=op.space.names, method="double_backward").matvec(v)
    assert rel(op.matvec(v), fresh) <= 1e-12 and op.cache_rebuilds == 2


def test_check_deterministic_is_still_meaningful():
    batch = (torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,)))
    op = HessianOperator(Noisy().to(F64), nn.functional.cross_entropy, batch, method=CACHED)
    op.matvec(torch.ones(op.dim, dtype=F64))  # same graph: two products would agree trivially
    with pytest.raises(RuntimeError, match="not deterministic"):
        op.check_deterministic()
    model, loss, batch = tiny_gpt2()
    assert HessianOperator(model, loss, batch, method=CACHED).check_deterministic() == 0.0


def test_auto_obeys_the_memory_guard():
    model, loss, batch = tiny_gpt2()
    op = HessianOperator(model, loss, batch, max_cache_bytes=0)
    assert op.method != CACHED and "skipped" in op.timings[CACHED]
    assert op.timings["cache_bytes_estimate"] > 0 and op.cache_bytes == 0  # trial graph freed
    op = HessianOperator(model, loss, batch, method=CACHED, max_cache_bytes=0)  # explicit: obeyed
    assert op.method == CACHED


def _hooked_build(L, params):
    """The same graph built under saved-tensor hooks: an independent measure of what it saves."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        graph = CachedGraph(L, params)
    return graph, sum(seen.values())


@pytest.mark.parametrize("make", [tiny_cnn, tiny_gpt2], ids=["cnn", "gpt2"])
def test_graph_walk_measures_what_hooks_measure_and_products_accumulate_exactly(make):
    model, loss, batch = make()
    op = HessianOperator(model, loss, batch, method=CACHED)
    hooked_graph, hooked = _hooked_build(op._L[0], op.params)
    assert abs(hooked_graph.nbytes - hooked) <= 0.001 * hooked  # scalars aside, the same storages
    graph = op._graph(0)
    # θ is the graph's only leaf, so a product accumulates into θ.grad (taken and reset each time)
    assert graph.accumulate
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4), dtype=F64)
    public = torch.autograd.grad(graph.g, graph.flat, grad_outputs=v, retain_graph=True)[0]
    for _ in range(2):
        assert torch.equal(graph.hvp_flat(v), public) and graph.flat.grad is None
    graph.accumulate = False  # the path of large parameter spaces: θ as the engine's explicit input
    assert torch.equal(graph.hvp_flat(v), public) and graph.flat.grad is None


def test_a_loss_reading_another_grad_tensor_keeps_the_explicit_input_path():
    """A loss closing over a tensor that requires grad (a learnable temperature, say) gives the graph a
    second leaf: products must not accumulate into it, and must stay exact."""
    model, loss, batch = mlp_with_unused()
    temperature = torch.tensor(1.7, dtype=F64, requires_grad=True)

    def tempered(out, y):
        return loss(out / temperature, y)

    op = HessianOperator(model, tempered, batch, method=CACHED)
    graph = op._graph(0)
    assert not graph.accumulate
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    H = reference_hessian(model, tempered, [batch])
    assert rel(op.matvec(v), H @ v) <= 1e-10 and temperature.grad is None
