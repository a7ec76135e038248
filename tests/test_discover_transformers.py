"""Discovery on real `transformers` classes built from tiny configs: families, generator counts that follow
from the architecture, float64 verification, and the reasons for what is broken."""
import pytest
import torch

from eqlab.analyses.discover import discover, negative_controls
from eqlab.analyses.identities import check_all, rejected
from eqlab.models import hf_tiny

torch.set_num_threads(1)
D, H, L = 16, 2, 2          # hidden size, heads, layers of the tiny configs
DH = D // H                 # head dimension


def _check_verified(d, allowed_broken=()):
    """Everything verifies to float64 roundoff except the families in ``allowed_broken`` (returned)."""
    broken = {}
    for f in d.found:
        if f.verified:   # verified: every order within its float64 rounding bound (analyses.identities: p·γ_n(u)·R)
            continue
        else:
            assert f.transformation.family in allowed_broken, f.as_row()
            broken.setdefault(f.transformation.family, []).append(f)
    return broken


def test_gpt2_relu_untied():
    model, loss, batch = hf_tiny.gpt2()
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"ln_residual_scale"})
    # the one joint stream scale is broken by LN eps = 1e-5 (stream variance ~ 1e-3 at init)
    (f,) = broken["ln_residual_scale"]
    assert "eps=1e-05" in f.reason and 1e-5 < f.residual < 0.1
    fam = d.families()
    assert fam["qk_gl"] == L * H * DH ** 2 and fam["vo_gl"] == L * H * DH ** 2
    assert fam["softmax_translation"] == D               # lm_head has no bias
    assert fam["relu_rescale"] == L * 2 * D              # n_inner = 2D hidden units per block
    assert fam["ln_gain_rescale"] == (2 * L + 1) * D     # ln_1 -> c_attn, ln_2 -> c_fc, ln_f -> lm_head
    assert fam["key_bias_translation"] == L * D
    # stream translations: token rows + position rows + (input rows + bias) of each writer (attn and MLP c_proj)
    assert fam["ln_residual_translation"] == 11 + 5 + L * ((D + 1) + (2 * D + 1))
    assert fam["permutation"] == L


def test_gpt2_layer_norm_eps_tiny_makes_the_stream_scale_exact():
    model, loss, batch = hf_tiny.gpt2(layer_norm_epsilon=0.0)   # 1e-12 leaves r2 ~ 7e-10 > float64 rounding
    d = discover(model, loss, batch)
    _check_verified(d)
    assert d.families()["ln_residual_scale"] == 1


@pytest.mark.parametrize("act,family", [("gelu", "gelu_rescale"),                    # one F.gelu op
                                        ("gelu_new", "composite_activation_rescale")])  # tanh form, 8 ops
def test_gpt2_gelu_rescale_is_broken_as_not_homogeneous(act, family):
    model, loss, batch = hf_tiny.gpt2(activation=act)
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"ln_residual_scale", family})
    fs = broken[family]
    assert len(fs) == L and all("not positively homogeneous" in f.reason and f.residual > 1e-3 for f in fs)
    assert all(f.transformation.n_generators == 2 * D for f in fs)
    assert d.families()["qk_gl"] == L * H * DH ** 2       # attention is unaffected
    assert d.families()["permutation"] == L               # any elementwise activation keeps unit swaps


def test_gpt2_tied_embeddings_break_what_moves_the_unembedding():
    model, loss, batch = hf_tiny.gpt2(tie=True)
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"softmax_translation", "ln_gain_rescale", "ln_residual_scale",
                                 "ln_residual_translation"})
    for fam in ("softmax_translation", "ln_residual_translation"):
        (f,) = broken[fam]
        assert "shared" in f.reason and f.residual > 1e-3, f.as_row()
    (f,) = broken["ln_gain_rescale"]                     # only ln_f -> (tied) lm_head
    assert "ln_f" in f.transformation.name and "shared" in f.reason
    assert d.families()["ln_gain_rescale"] == 2 * L * D   # the in-block ones are untouched


def test_gpt2_negative_controls_rejected():
    model, loss, batch = hf_tiny.gpt2()
    controls = negative_controls(model, loss, batch)
    assert len(controls) == L + 1                         # wrong-sign rescale per MLP, one-class logit shift
    res = rejected(check_all(model.double(), loss, batch, controls, probes=1))
    assert len(res) == len(controls) and all(res.values())


def test_bert_sequence_classifier():
    model, loss, batch = hf_tiny.bert_classifier()
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"tanh_rescale", "ln_residual_scale"})
    (f,) = broken["tanh_rescale"]                        # pooler dense -> tanh -> classifier
    assert "not positively homogeneous" in f.reason and f.residual > 1e-3
    fam = d.families()
    assert fam["qk_gl"] == L * H * DH ** 2 and fam["vo_gl"] == L * H * DH ** 2
    assert fam["softmax_translation"] == D + 1           # classifier weight rows + bias
    assert fam["relu_rescale"] == L * 2 * D
    # post-LN: each LN output also feeds the residual, so only the last one (read by the pooler alone)
    # has a gain rescale, and only the embedding sum (3 writers) is a stream that only a LN reads
    assert fam["ln_gain_rescale"] == D
    fam_all = d.families(verified_only=False)
    assert fam_all["ln_residual_scale"] == 1 and fam["ln_residual_translation"] == 11 + 5 + 2
    assert fam["sign_flip"] == 1                          # tanh is odd
    # BERT's default LayerNorm eps = 1e-12 breaks the embedding-stream scale by ~eps/Var: r2 ~ 1e-11, over
    # the float64 rounding bound of this model
    (s,) = broken["ln_residual_scale"]
    assert "eps=1e-12" in s.reason and s.residual < 1e-9, s.as_row()


def test_bert_headless_with_unused_pooler():
    model, loss, batch = hf_tiny.bert_headless()
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"ln_residual_scale"})
    # BERT's eps = 1e-12 on an embedding stream of Var ~ 1e-3: the measured residual is under the rounding
    # bound, but the predicted eps/Var ~ 1e-9 is far above float64 rounding of the norm: approximate (eps)
    (s,) = broken["ln_residual_scale"]
    assert s.verdict == "approximate" and s.cause == "eps" and "eps=1e-12" in s.reason, s.as_row()
    fam = d.families()
    assert fam["qk_gl"] == H * DH ** 2 and fam["vo_gl"] == H * DH ** 2
    assert "softmax_translation" not in fam and "tanh_rescale" not in fam
    (u,) = [t for t in d.verified if t.family == "unused_parameter"]
    assert set(u.params) == {"pooler.dense.weight", "pooler.dense.bias"} and u.n_generators == D * D + D


def test_vit_classifier():
    model, loss, batch = hf_tiny.vit()
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"ln_residual_scale"})
    (s,) = broken["ln_residual_scale"]          # ViT's eps = 1e-12: approximate (eps), as for BERT
    assert s.verdict == "approximate" and s.cause == "eps", s.as_row()
    # image inputs are floating: every exact finding was also checked with the pixels x3
    assert all(f.residual_x3 == f.residual_x3 for f in d.found if f.verified)
    fam = d.families()
    assert fam["qk_gl"] == H * DH ** 2 and fam["vo_gl"] == H * DH ** 2
    assert fam["softmax_translation"] == D + 1
    assert fam["relu_rescale"] == 2 * D
    # layernorm_before -> q, k and v (three readers), layernorm_after -> fc1, final layernorm -> classifier
    assert fam["ln_gain_rescale"] == 3 * D
    qkv = next(t for t in d.verified if "layernorm_before" in t.name)
    assert {"q_proj", "k_proj", "v_proj"} <= {p.split(".")[-2] for p in qkv.params}
    # pre-LN stream written by the class token, the position embeddings (bare parameters), the patch conv,
    # o_proj and fc2: translations 1 + 5 + (D + 1) + (D + 1) + (2D + 1)
    assert d.families(verified_only=False)["ln_residual_scale"] == 1
    assert fam["ln_residual_translation"] == 1 + 5 + 3 * (D + 1) + D
    # ViT's eager attention evaluates its softmax in float32 whatever the model dtype: said, and the rounding
    # bound counts those float32 ops
    f = next(f for f in d.found if f.transformation.family == "qk_gl")
    assert any("dtype=float32" in c for c in f.caveats)


@pytest.mark.parametrize("eps", [None, 1e-20])   # 1e-20: exact to float64 rounding (1e-12 is borderline)
def test_resnet_batchnorm(eps):
    model, loss, batch = hf_tiny.resnet(bn_eps=eps)
    d = discover(model, loss, batch)
    broken = _check_verified(d, {"bn_scale"} if eps is None else ())
    channels = 4 + (4 + 4) + (8 + 8 + 8)        # stem, stage 1 (2 convs), stage 2 (2 convs + shortcut conv)
    fam = d.families(verified_only=False)
    assert fam["bn_scale"] == channels                   # one per BN channel fed by a conv
    if eps is None:                                      # default eps = 1e-5 breaks all six, by ~eps/Var
        assert len(broken["bn_scale"]) == 6
        assert all("eps=1e-05" in f.reason and 1e-7 < f.residual < 1e-3 for f in broken["bn_scale"])
    # a ReLU rescale exists only where conv-BN-ReLU feeds a single conv; the ReLUs after the (in-place)
    # residual adds are not proposed: the tracer sees `h += r` as a new tensor
    assert fam["relu_rescale"] == 4 + 8
    assert fam["softmax_translation"] == 8 + 1
    assert "bn_translation" not in fam                   # HF ResNet convs have no bias
