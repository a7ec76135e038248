"""Additive attention-score biases on real `transformers` classes (tiny configs, float64, eager attention).

Learned relative-position biases with a head axis (T5's bias embedding, Swin's bias table): the reported head
permutation carries the table's head columns, and an independent float64 check (the reported index swaps
applied by hand, the model run through functional_call) leaves the loss unchanged on the batch and, for
Swin's images, on inputs x3. Negative: the same swap without the table's columns changes the loss by exactly
what swapping the table's columns alone does (the two differ by a head relabelling). ALiBi (Falcon with
alibi=True: fixed per-head slopes, no parameter) makes the head permutation broken, never exact, and a
control; its loss change is exactly that of swapping the two heads' slopes.
"""
import pytest
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.discover.zoo import ZOO
from eqlab.analyses.identities import check_all

from hand_checks import REL, loss_at as _loss, swapped as _swapped

torch.set_num_threads(1)


def _head_permutation(d):
    (f,) = [f for f in d.found if f.transformation.family == "head_permutation"]
    return f


@pytest.fixture(scope="module", params=["T5EncoderModel", "SwinForImageClassification"])
def learned(request):
    model, loss, batch = ZOO[request.param]()
    return request.param, model, loss, batch, discover(model, loss, batch)


def test_learned_bias_head_permutation_carries_the_table_columns(learned):
    name, model, loss, batch, d = learned
    f = _head_permutation(d)
    assert f.verdict == "exact" and f.transformation.expected, f.as_row()
    params = dict(model.named_parameters())
    table = _table(f)
    assert table[1] == 1 and table[2][:2] == [1, 0]          # the head axis of (entries, heads), heads 0 <-> 1
    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, _swapped(params, f.transformation.terms)) - base) <= REL * abs(base)
    if batch[0].is_floating_point():                          # Swin's pixels: the same on inputs x3
        b3 = (3 * batch[0], batch[1])
        base3 = _loss(model, loss, b3, params)
        assert abs(_loss(model, loss, b3, _swapped(params, f.transformation.terms)) - base3) <= REL * abs(base3)
    # negative: leave the table out; the loss moves by exactly what swapping the table alone does
    rest = [t for t in f.transformation.terms if t is not table]
    moved = _loss(model, loss, batch, _swapped(params, rest)) - base
    expected = _loss(model, loss, batch, _swapped(params, [table])) - base
    assert abs(expected) > 1e6 * REL * abs(base), expected   # the columns matter on this batch
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)


def _table(f):
    (t,) = [t for t in f.transformation.terms if t[0].endswith(("relative_attention_bias.weight",
                                                               "relative_position_bias_table"))]
    return t


def test_learned_bias_rejects_a_wrong_column_swap(learned):
    """The projections swap heads 0 and 1; swapping the table columns of heads 2 and 3 instead moves the loss."""
    name, model, loss, batch, d = learned
    f = _head_permutation(d)
    table = _table(f)
    heads = len(table[2])
    if heads < 4:
        pytest.skip(f"{heads} heads: no disjoint wrong pair")
    wrong = [[n, a, [0, 1, 3, 2] + list(range(4, heads)) if n == table[0] else p] for n, a, p in f.transformation.terms]
    params = dict(model.named_parameters())
    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, _swapped(params, wrong)) - base) > 1e6 * REL * abs(base)


def test_alibi_head_permutation_is_broken_and_a_control():
    import transformers.models.falcon.modeling_falcon as mf

    model, loss, batch = ZOO["FalconForCausalLM(alibi)"]()
    d = discover(model, loss, batch)
    f = _head_permutation(d)
    assert f.verdict == "broken" and f.cause == "fixed_bias" and "ALiBi" in f.reason, f.as_row()
    assert not f.transformation.expected                    # a control, never a violated symmetry
    checks = check_all(model.double(), loss, batch, [f.transformation], probes=1)
    assert {c.verdict for c in checks} == {"rejected"}, [c.as_row() for c in checks]
    # the loss change is exactly that of swapping the two heads' ALiBi slopes (a head relabelling)
    params = dict(model.named_parameters())
    base = _loss(model, loss, batch, params)
    moved = _loss(model, loss, batch, _swapped(params, f.transformation.terms)) - base
    original = mf.build_alibi_tensor

    def swapped_slopes(mask, num_heads, dtype):
        a = original(mask, num_heads, dtype).reshape(mask.shape[0], num_heads, 1, -1)
        return a[:, [1, 0] + list(range(2, num_heads))].reshape(mask.shape[0] * num_heads, 1, -1)

    mf.build_alibi_tensor = swapped_slopes
    try:
        expected = _loss(model, loss, batch, params) - base
    finally:
        mf.build_alibi_tensor = original
    assert abs(expected) > 1e6 * REL * abs(base)
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)


def test_a_bias_table_shared_by_blocks_needs_one_joint_head_permutation():
    """T5 computes its relative-position bias in block 0 and every later block adds the same tensor: a head
    swap of one block alone moves the other's bias (broken, cause shared, a control); the swap of both blocks
    with the table's columns moved once is exact. Negative: block 0's swap alone moves the loss exactly as
    much as swapping block 1's projections alone does (their composition is the exact joint swap)."""
    model, loss, batch = ZOO["T5EncoderModel(2 layers)"]()
    d = discover(model, loss, batch)
    hp = [f for f in d.found if f.transformation.family == "head_permutation"]
    (joint,) = [f for f in hp if "blocks sharing" in f.transformation.name]
    single = [f for f in hp if f is not joint]
    assert joint.verdict == "exact" and len(single) == 2, [f.as_row() for f in hp]
    assert all(f.verdict == "broken" and f.cause == "shared" and not f.transformation.expected for f in single)
    params = dict(model.named_parameters())
    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, _swapped(params, joint.transformation.terms)) - base) <= REL * abs(base)
    block0 = next(f for f in single if "block.0." in f.transformation.name).transformation.terms
    block1_only = [t for t in joint.transformation.terms if ".block.1." in t[0]]
    moved = _loss(model, loss, batch, _swapped(params, block0)) - base
    expected = _loss(model, loss, batch, _swapped(params, block1_only)) - base
    assert abs(expected) > 1e6 * REL * abs(base)
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)
