"""Discovery beyond the catalog: Llama-family models (RMSNorm, RoPE, SwiGLU, GQA), hand-written norms and a
bilinear GLU in plain PyTorch, and an honest 'none found'. Each family: float64 residual, and a control."""
import pytest
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.identities import check_all, rejected
from eqlab.analyses.transforms import GLFamily, SubGLFamily, TranslationFamily
from eqlab.models.generic_blocks import NormGLUNet, TiedTanhSoftplus
from eqlab.models.hf_llama import llama
from eqlab.models.losses import cross_entropy, squared_error

torch.set_num_threads(1)
D, H, KV = 16, 4, 2           # hidden, query heads, key/value heads
DH = D // H                   # head dim (2 rotary frequency pairs)


def _ok(d, allowed_broken=()):
    broken = {}
    for f in d.found:
        if f.verified:   # verified: every order within its float64 rounding bound (analyses.identities: p·γ_n(u)·R)
            continue
        else:
            assert f.transformation.family in allowed_broken, f.as_row()
            broken.setdefault(f.transformation.family, []).append(f)
    return broken


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_family_symmetries(family):
    model, loss, batch = llama(family)
    d = discover(model, loss, batch)
    broken = _ok(d, {"qk_gl", "silu_gate_rescale", "rms_residual_scale"})
    fam = d.families()
    # V/O: one GL(d_head) per key/value head, acting on that V head and on the O slices of its 2 query heads
    assert fam["vo_gl"] == KV * DH ** 2
    vo = next(t for t in d.verified if t.family == "vo_gl")
    assert [len(b) for b in vo.blocks] == [1 + (family == "qwen2") + H // KV] * KV   # (+ v bias)
    # Q/K: RoPE leaves the commutant of the rotations, aI + bJ per frequency pair: d_head per kv head
    assert fam["qk_commutant"] == KV * DH
    qk = next(t for t in d.verified if t.family == "qk_commutant")
    assert isinstance(qk, SubGLFamily) and len(qk.basis) == DH
    (g,) = broken["qk_gl"]                                    # the full GL(d_head) is broken, and says why
    assert "rotary embedding" in g.reason and g.residual > 1e-2
    assert fam["glu_rescale"] == 2 * D                        # up_proj row i x a, down_proj column i / a
    (s,) = broken["silu_gate_rescale"]                        # the gate side: SiLU is not homogeneous
    assert "not positively homogeneous" in s.reason and s.residual > 1e-2
    assert fam["rms_gain_rescale"] == 3 * D                   # input/post-attention/final norm -> readers
    # eps = 1e-6 moves the stream scale by ~eps/mean(x²) ~ 1e-5; HF's RMSNorm runs in float32 inside the
    # float64 model, so the worst-case rounding of those ops (~1e-4 at order 2) covers the measured gap —
    # but the algebra says eps breaks it, and the predicted eps/mean(x²) is far above float64 rounding of the
    # norm: approximate, with the cause, not exact
    r = next(f for f in d.found if f.transformation.family == "rms_residual_scale")
    assert r.verdict == "approximate" and r.cause == "eps" and "eps=1e-06" in r.reason, r.as_row()
    assert 1e-8 < r.residual < 1e-3 and any("float32" in c for c in r.caveats), r.as_row()
    assert fam["softmax_translation"] == D                    # untied lm_head, no bias
    assert fam["permutation"] == 1 and fam["head_permutation"] == 1 and fam["sign_flip"] == 1
    # RMSNorm has no mean subtraction: no translation of the stream or of a norm's input, none proposed
    every = d.families(verified_only=False)
    assert not [k for k in every if "translation" in k and k != "softmax_translation"], every


def test_llama_rms_eps_zero_makes_the_stream_scale_exact():
    model, loss, batch = llama(eps=0.0)
    d = discover(model, loss, batch)
    _ok(d, {"qk_gl", "silu_gate_rescale", "rms_residual_scale"})
    # HF's RMSNorm upcasts to float32 even in a float64 model: the exact scale then reads ~1e-7, not 1e-16,
    # and says so; well below the eps = 1e-6 violation (~1e-5) and the float64 tolerance
    f = next(f for f in d.found if f.transformation.family == "rms_residual_scale")
    assert f.verified and f.verdict == "exact" and any("float32" in c for c in f.caveats), f.as_row()   # within the float32-op bound


def test_llama_controls_wrong_generator_and_wrong_grouping():
    model, loss, batch = llama()
    d = discover(model, loss, batch)
    qk = next(t for t in d.verified if t.family == "qk_commutant")
    vo = next(t for t in d.verified if t.family == "vo_gl")
    # (1) a generator outside the commutant: the symmetric traceless part of a rotary pair, diag(1, -1)
    pair = [i for i in range(DH) if i != 0 and any(e[1] == 0 and e[2] == i for b in qk.basis for e in b)][0]
    bad_basis = [[["M", 0, 0, 1.0], ["M", pair, pair, -1.0], ["N", 0, 0, -1.0], ["N", pair, pair, 1.0]]]
    wrong_gen = SubGLFamily("qk_wrong_generator", "negative_control", qk.blocks, bad_basis, expected=False)
    # (2) grouped-query attention paired per query head: two independent M on one shared V head
    split = [[b[0], o] for b in vo.blocks for o in b[1:]]
    wrong_group = GLFamily("vo_per_query_head", "negative_control", split, expected=False)
    m64 = model.double()
    res = rejected(check_all(m64, loss, batch, [wrong_gen, wrong_group], probes=1))
    assert res == {"qk_wrong_generator": True, "vo_per_query_head": True}


def _norm_glu():
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    return NormGLUNet().double(), cross_entropy, (x.double(), y)


def test_hand_written_norms_and_bilinear_glu():
    model, loss, batch = _norm_glu()
    d = discover(model, loss, batch)
    _ok(d)
    fam = d.families()
    assert fam["rms_scale"] == 1            # ScaleNorm x/||x||: lin0 (weight and bias) scale invariance
    assert fam["ln_scale"] == 1 and fam["ln_translation"] == 8 + 1   # hand LN: lin1 scale and shift
    assert fam["glu_rescale"] == 2 * 6 and fam["sign_flip"] == 2 and fam["permutation"] == 1
    assert fam["softmax_translation"] == 8 + 1
    # ScaleNorm divides by the norm only: no translation of lin0 proposed, and a declared one fails
    assert not any("translation" in t.name and "lin0" in ",".join(t.params) for t in d.verified)
    shift = TranslationFamily("scalenorm_translation", "negative_control",
                              [["lin0.weight", 0, None, "broadcast"], ["lin0.bias", 0, None, "broadcast"]],
                              {"lin0.weight": [8, 6], "lin0.bias": [8]}, expected=False)
    assert rejected(check_all(model, loss, batch, [shift], probes=1))["scalenorm_translation"]


def test_hand_layer_norm_eps_breaks_only_its_scale():
    torch.manual_seed(0)
    model = NormGLUNet(eps=1e-3).double()
    x, y = torch.randn(16, 6).double(), torch.randint(0, 4, (16,))
    d = discover(model, cross_entropy, (x, y))
    (f,) = d.broken
    assert f.transformation.family == "ln_scale" and "eps=0.001" in f.reason and f.residual > 1e-6
    assert d.families()["ln_translation"] == 9  # the mean subtraction still removes a shift exactly


def test_no_symmetry_of_the_known_kinds_is_found():
    torch.manual_seed(0)
    model = TiedTanhSoftplus().double()
    x, y = torch.randn(16, 6).double(), torch.randn(16, 3).double()
    d = discover(model, squared_error, (x, y))
    assert d.verified == []                                   # nothing spurious verifies
    assert all(f.residual > 1e-2 for f in d.found), [f.as_row() for f in d.found]


def test_active_dropout_is_named_as_the_reason_and_eval_mode_verifies():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    noisy = discover(model.train(), torch.nn.functional.cross_entropy, batch)
    assert noisy.found and all(not f.verified and "active dropout" in f.reason for f in noisy.found)
    clean = discover(model.eval(), torch.nn.functional.cross_entropy, batch)
    assert {"relu_rescale", "softmax_translation"} <= {f.transformation.family for f in clean.found if f.verified}
