"""Shared (tied) weights: a transformation must act jointly on every use of a parameter. On GPT-2 with
tie_word_embeddings=True (lm_head.weight is transformer.wte.weight; tiny config, float64, eager attention):

* the residual-stream permutation (swap two hidden features in every writer, norm and reader) moves the tied
  matrix once, along its hidden axis, which is right for both of its uses: exact, with an independent float64
  check; leaving the tied matrix out moves the loss exactly as much as permuting it alone;
* every transformation built from one use only (the joint residual-stream scale, the softmax translation of
  the unembedding, the ln_f gain moved into it) is broken with the shared parameter as its cause (a hard
  cause, so a control), never `approximate` by the norm's eps: untied, the same stream scale is approximate.
"""
import pytest
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.discover.zoo import ZOO

from hand_checks import REL, loss_at as _loss, swapped as _swapped

torch.set_num_threads(1)
WTE = "transformer.wte.weight"


@pytest.fixture(scope="module")
def tied():
    model, loss, batch = ZOO["GPT2LMHeadModel(tied)"]()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model, loss, batch, discover(model, loss, batch)


def _one(d, family):
    (f,) = [f for f in d.found if f.transformation.family == family]
    return f


def test_residual_permutation_moves_the_tied_matrix_once_and_is_exact(tied):
    model, loss, batch, d = tied
    f = _one(d, "ln_residual_permutation")
    assert f.verdict == "exact", f.as_row()
    terms = f.transformation.terms
    (wte,) = [t for t in terms if t[0] == WTE]
    assert wte[1] == 1 and wte[2][:2] == [1, 0]           # its hidden axis, features 0 <-> 1
    assert not any(t[0] == "lm_head.weight" for t in terms)
    params = dict(model.named_parameters())
    base = _loss(model, loss, batch, params)
    assert abs(_loss(model, loss, batch, _swapped(params, terms)) - base) <= REL * abs(base)
    # negative: leave the tied matrix out: the loss moves exactly as much as swapping its columns alone does
    moved = _loss(model, loss, batch, _swapped(params, [t for t in terms if t is not wte])) - base
    expected = _loss(model, loss, batch, _swapped(params, [wte])) - base
    assert abs(expected) > 1e6 * REL * abs(base)
    assert abs(moved - expected) <= 2 * REL * abs(base), (moved, expected)


@pytest.mark.parametrize("family", ["ln_residual_scale", "softmax_translation", "ln_gain_rescale"])
def test_one_use_transformations_are_broken_by_the_shared_weight(tied, family):
    _, _, _, d = tied
    fs = [f for f in d.found if f.transformation.family == family and WTE in f.transformation.params]
    assert fs
    for f in fs:
        assert f.verdict == "broken" and f.cause == "shared" and WTE in f.reason, f.as_row()
        assert not f.transformation.expected   # a control: the identity rows say so


def test_scaling_the_stream_changes_the_tied_logits(tied):
    """Independent: doubling every stream writer (the tied matrix included) doubles the logits too, so the loss
    moves far above rounding; untied, the same doubling only meets LayerNorm's eps (approximate)."""
    model, loss, batch, d = tied
    params = dict(model.named_parameters())
    writers = [WTE, "transformer.wpe.weight"] + [n for n in params if n.endswith(("c_proj.weight", "c_proj.bias"))]
    base = _loss(model, loss, batch, params)
    doubled = {**params, **{n: 2 * params[n] for n in writers}}
    assert abs(_loss(model, loss, batch, doubled) - base) > 1e6 * REL * abs(base)
    um, ul, ub = ZOO["GPT2LMHeadModel"]()
    s = _one(discover(um, ul, ub), "ln_residual_scale")
    assert s.verdict == "approximate" and s.cause == "eps", s.as_row()
