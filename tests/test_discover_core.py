"""Discovery on the real model families: the expected families, generator counts, and verification."""
import pytest
import torch

from eqlab import models

from eqlab.analyses.discover import discover, negative_controls
from eqlab.analyses.identities import check_all, rejected

N = 16


def _task(family, **opt):
    t = models.build_task(family, opt, 0, torch.float32)
    X, y = t.train
    return t.model, t.loss, (X[:N], y[:N])


def test_digits_cnn_families_and_counts():
    # bn_eps = 1e-20: exact to float64 rounding; 1e-12 leaves r2 ~ 5e-11, a measurable violation (below)
    model, loss, batch = _task("digits_cnn", bn_eps=1e-20)
    d = discover(model, loss, batch)
    assert not d.broken, [f.as_row() for f in d.broken]
    fam = d.families()
    assert fam["softmax_translation"] == 32 + 1          # fc2 rows + bias
    assert fam["bn_scale"] == 8 + 16                     # one per BN channel
    assert fam["bn_translation"] == 8 + 16               # conv bias before BN
    assert fam["relu_rescale"] == 8 + 16 + 32            # bn1->conv2, bn2->(pool, flatten)->fc1, fc1->fc2
    names = {t.name for t in d.verified}
    assert "relu_rescale[bn2->fc1]" in names and "bn_scale[conv1->bn1]" in names
    # through the 2x2 pool and flatten, BN channel c owns 16 consecutive fc1 input columns
    t = next(t for t in d.verified if t.name == "relu_rescale[bn2->fc1]")
    assert t.generators[3][-1] == ["fc1.weight", 1, list(range(48, 64)), -1.0]
    assert all(f.verified for f in d.found)  # verified: every order within its float64 rounding bound (analyses.identities: p·γ_n(u)·R)


def test_bn_eps_1e12_is_reported_broken_at_second_order():
    model, loss, batch = _task("digits_cnn", bn_eps=1e-12)
    d = discover(model, loss, batch)
    assert {f.transformation.family for f in d.broken} == {"bn_scale"}
    for f in d.broken:   # ~eps/Var at first order (under its bound), ~50·eps at second (over it)
        assert "eps=1e-12" in f.reason and f.residuals[2] == f.residual and 1e-12 < f.residual < 1e-9, f.as_row()


def test_default_bn_eps_is_reported_broken_with_reason():
    model, loss, batch = _task("digits_cnn")  # bn_eps = 1e-5
    d = discover(model, loss, batch)
    broken = {f.transformation.family for f in d.broken}
    assert broken == {"bn_scale"}
    for f in d.broken:
        assert "eps=1e-05" in f.reason and 1e-7 < f.residual < 1e-2
    assert d.families()["relu_rescale"] == 56  # the rest still verifies


def test_modadd_gpt2_families_and_counts():
    model, loss, batch = _task("modadd_gpt2")  # n_embd 32, 2 heads of 16, relu, untied
    d = discover(model, loss, batch)
    # only the residual-stream scale is broken, by the default LN eps = 1e-5 (stream Var ~ 4e-4 at init)
    assert {f.transformation.family for f in d.broken} == {"ln_residual_scale"}
    assert all("eps=1e-05" in f.reason for f in d.broken)
    fam = d.families()
    assert fam["softmax_translation"] == 32              # lm_head has no bias: d generators
    assert fam["relu_rescale"] == 4 * 32                 # one per MLP hidden unit (c_fc cols / c_proj rows)
    assert fam["qk_gl"] == 2 * 16 ** 2                   # n_head · d_head²
    assert fam["vo_gl"] == 2 * 16 ** 2
    assert fam["key_bias_translation"] == 32
    assert fam["ln_gain_rescale"] == 3 * 32              # ln_1->c_attn, ln_2->c_fc, ln_f->lm_head
    qk = next(t for t in d.verified if t.family == "qk_gl")
    # head 1's query columns of the packed c_attn are 16..31, its key columns 48..63
    assert qk.blocks[1][0] == ["transformer.h.0.attn.c_attn.weight", 1, list(range(16, 32)), "M"]
    assert qk.blocks[1][2] == ["transformer.h.0.attn.c_attn.weight", 1, list(range(48, 64)), "-MT"]


def test_gelu_rescale_is_found_and_broken():
    model, loss, batch = _task("modadd_gpt2", activation="gelu")
    d = discover(model, loss, batch)
    (f,) = [f for f in d.broken if f.transformation.family != "ln_residual_scale"]
    assert f.transformation.family == "gelu_rescale" and "homogeneous" in f.reason
    assert f.residual > 1e-2
    assert "qk_gl" in d.families()


def test_tied_embeddings_break_softmax_translation():
    model, loss, batch = _task("modadd_gpt2", tie_word_embeddings=True)
    d = discover(model, loss, batch)
    f = next(f for f in d.found if f.transformation.family == "softmax_translation")
    assert not f.verified and "shared" in f.reason and f.residual > 1e-3


@pytest.mark.parametrize("family,opt", [("digits_cnn", {"bn_eps": 1e-20}), ("modadd_gpt2", {})])
def test_negative_controls_are_rejected(family, opt):
    model, loss, batch = _task(family, **opt)
    controls = negative_controls(model, loss, batch)
    m64 = model.double()
    b64 = (batch[0].double(), batch[1]) if batch[0].is_floating_point() else batch
    assert {t.family for t in controls} == {"negative_control"} and len(controls) >= 2
    checks = check_all(m64, loss, b64, controls, probes=1)
    assert all(rejected(checks).values()) and len(rejected(checks)) == len(controls)


def test_discover_leaves_model_untouched():
    model, loss, batch = _task("digits_cnn")
    before = {n: b.clone() for n, b in model.state_dict().items()}
    discover(model, loss, batch)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert next(model.parameters()).dtype == torch.float32
