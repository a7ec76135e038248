"""Bias transfers, layer scales and offset norm gains, found from the computation graph of real `transformers`
classes (tiny configs, float64, eager attention): a LayerNorm's bias into every linear map reading the norm,
a value bias into the output projection, a per-channel layer scale after a linear map, and Gemma's
(1 + w) RMSNorm gains rescaled in their affine coordinates. Each exact finding has an independent few-line
float64 check that the loss is unchanged (and on inputs x3 where the inputs are floating), a negative control
(a reader left out, the wrong sign, the offset ignored) that must move the loss, and each site where the
family cannot apply gets a stored reason."""
import copy

import pytest
import torch
import torch.nn.functional as F

from eqlab.analyses.discover import affine_family_controls, candidates, discover
from eqlab.analyses.discover.zoo import ZOO
from eqlab.analyses.identities import check_all, gamma, unit_roundoff
from eqlab.analyses.transforms import BiasTransferFamily, GroupElement, OffsetScaleFamily, Transformation
from eqlab.models import hf_tiny
from tests.test_discover_algebra import loss_change

torch.set_num_threads(1)


def _found(d, family):
    return [f for f in d.found if f.transformation.family == family]


def _by_source(fs, source):
    (f,) = [f for f in fs if f.transformation.source[0] == source]
    return f


def _reasons(d, family):
    return [r for r in d.rejected if r.family == family]


def _apply(T):
    """An edit applying the discovered transformation T (a finite element) to a model copy's parameters."""
    def edit(p):
        for n, v in T.apply({n: p[n].detach().clone() for n in T.params}).items():
            p[n].copy_(v)
    return edit


def _delta(n, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------ GPT-2
@pytest.fixture(scope="module")
def gpt2():
    model, loss, batch = hf_tiny.gpt2(n_layer=1)
    model = model.double()
    return model, loss, batch, discover(model, loss, batch)


def test_gpt2_layernorm_bias_moves_into_the_fused_qkv_and_mlp_biases(gpt2):
    model, loss, batch, d = gpt2
    fs = _found(d, "ln_bias_transfer")
    ln1 = _by_source(fs, "transformer.h.0.ln_1.bias")
    ln2 = _by_source(fs, "transformer.h.0.ln_2.bias")
    for f in (ln1, ln2):
        assert f.verdict == "exact" and f.transformation.n_generators == 16, f.as_row()
    # Conv1D reads x @ W (weight (in, out)): the compensation contracts W's input axis 0
    (r,) = ln1.transformation.readers
    assert r[:3] == ["transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_attn.weight", 0], r
    # ln_f feeds lm_head, which has no bias: not proposed, and said why
    assert any("lm_head" in x.reason and "no bias" in x.reason for x in _reasons(d, "ln_bias_transfer"))
    # independent check: β += δ, b_attn −= δ W_attn (x @ W + b form); the wrong sign moves the loss
    delta = _delta(16, 0)

    def edit(sign):
        def e(p):
            p["transformer.h.0.ln_1.bias"] += delta
            p["transformer.h.0.attn.c_attn.bias"] += sign * delta @ p["transformer.h.0.attn.c_attn.weight"]
        return e

    r_, level = loss_change(model, loss, batch, edit(-1.0))
    assert r_ <= level, (r_, level)
    r_, level = loss_change(model, loss, batch, edit(+1.0))
    assert r_ > 1e3 * level, (r_, level)
    # the discovered finite element is that edit (θ + sξ with s = 1, c = δ)
    T = GroupElement(ln1.transformation, delta, 1.0)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    moved = T.apply({n: theta[n] for n in T.params})
    b, W = theta["transformer.h.0.attn.c_attn.bias"], theta["transformer.h.0.attn.c_attn.weight"]
    want = b - delta @ W
    # the same 16-term dot products and one add, summed in any order: entrywise within γ_17(u)·(|δ||W| + |b|)
    bound = gamma(17, unit_roundoff(torch.float64)) * (delta.abs() @ W.abs() + b.abs())
    assert bool(((moved["transformer.h.0.attn.c_attn.bias"] - want).abs() <= bound).all())


def test_gpt2_layernorm_bias_gradient_identity_in_closed_form(gpt2):
    """First order of the transfer, written out: g_β = W g_b for Conv1D's x @ W + b (every token's shift meets
    W), and discovery checked orders 0-2 within their rounding levels; the same identity with the wrong sign
    (g_β = −W g_b) fails by O(1)."""
    model, loss, batch, d = gpt2
    f = _by_source(_found(d, "ln_bias_transfer"), "transformer.h.0.ln_1.bias")
    assert sorted(f.residuals) == [0, 1, 2] and f.residual <= f.tolerance, f.as_row()
    m = copy.deepcopy(model)
    L = loss(m(batch[0]), batch[1])
    ln_b, W, b = m.transformer.h[0].ln_1.bias, m.transformer.h[0].attn.c_attn.weight, m.transformer.h[0].attn.c_attn.bias
    g_beta, g_b = torch.autograd.grad(L, [ln_b, b])
    rhs = W.detach() @ g_b
    # both sides are sums over the same tokens·features of products of backward terms: within
    # 2·γ_n(u) of their magnitudes (n = the rounding model's chain length), far under the O(1) of the wrong sign
    from eqlab.analyses.identities import chain_length
    mag = float((W.detach().abs() @ g_b.abs()).norm()) + float(g_beta.norm())
    bound = 2 * gamma(chain_length(model, batch), unit_roundoff(torch.float64)) * mag
    assert float((g_beta - rhs).norm()) <= bound, (float((g_beta - rhs).norm()), bound)
    assert float((g_beta + rhs).norm()) > 1e3 * bound


def test_gpt2_value_bias_moves_into_the_output_projection_bias(gpt2):
    model, loss, batch, d = gpt2
    (f,) = _found(d, "value_bias_transfer")
    t = f.transformation
    assert f.verdict == "exact" and t.source == ["transformer.h.0.attn.c_attn.bias", list(range(32, 48))], f.as_row()
    assert [r[0] for r in t.readers] == ["transformer.h.0.attn.c_proj.bias"]
    delta = _delta(16, 1)
    a = "transformer.h.0.attn."

    def edit(sign, value=True):
        def e(p):
            if value:
                p[a + "c_attn.bias"][32:48] += delta      # v = x W_v + b_v: every token's value moves by δ
            else:
                p[a + "c_attn.bias"][16:32] += delta      # the key bias instead: P's rows no longer shift V
            p[a + "c_proj.bias"] += sign * delta @ p[a + "c_proj.weight"]
        return e

    r, level = loss_change(model, loss, batch, edit(-1.0))
    assert r <= level, (r, level)        # P(V + 1δᵀ) = PV + 1δᵀ: softmax rows sum to 1
    for bad in (edit(+1.0), edit(-1.0, value=False)):
        r, level = loss_change(model, loss, batch, bad)
        assert r > 1e3 * level, (r, level)


def test_transfer_controls_are_rejected_by_the_identity_checks(gpt2):
    model, loss, batch, d = gpt2
    cands, _ = candidates(model, loss, batch)
    ctrls = [c for c in affine_family_controls(cands) if isinstance(c, BiasTransferFamily)]
    assert {c.name.split("[")[0] for c in ctrls} == {"bias_transfer_wrong_sign"} and len(ctrls) == 3
    checks = check_all(copy.deepcopy(model), loss, batch, ctrls, probes=1)
    for c in checks:   # every order of every control is outside its rounding level, by a factor of 1e3 at least
        assert c.expected is False and not c.holds and c.residual > 1e3 * c.tolerance, c.as_row()


# -------------------------------------------------------------------- Phi: one LayerNorm, four biased readers
def test_phi_parallel_block_layernorm_bias_needs_all_four_readers():
    model, loss, batch = ZOO["PhiForCausalLM"]()
    d = discover(model, loss, batch)
    f = _by_source(_found(d, "ln_bias_transfer"), "model.layers.0.input_layernorm.bias")
    readers = [r[1] for r in f.transformation.readers]
    a = "model.layers.0."
    assert f.verdict == "exact" and sorted(readers) == sorted(
        a + x + ".weight" for x in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")), readers
    delta = _delta(32, 2)
    names = [a + x for x in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")]

    def edit(compensated):
        def e(p):
            p[a + "input_layernorm.bias"] += delta
            for n in compensated:                 # nn.Linear: y = x Wᵀ + b, so b −= W δ
                p[n + ".bias"] -= p[n + ".weight"] @ delta
        return e

    low = (torch.float32, 32)   # Phi's attention softmax runs in float32 inside the float64 model
    r, level = loss_change(model, loss, batch, edit(names), low)
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, edit(names[:-1]), low)   # negative: fc1 left uncompensated
    assert r > 1e3 * level, (r, level)
    # the missing-reader control is proposed alongside and fails its identities
    cands, _ = candidates(model, loss, batch)
    (miss,) = [c for c in affine_family_controls(cands) if c.name.startswith("bias_transfer_missing_reader")
               and "input_layernorm" in c.name]
    assert all(not c.holds for c in check_all(copy.deepcopy(model), loss, batch, [miss], probes=1))


# ------------------------------------------------------------------------ post-LN BERT: where it cannot apply
def test_bert_post_ln_norms_read_by_the_residual_get_a_reason_not_a_transfer():
    model, loss, batch = hf_tiny.bert_classifier(n_layer=1)
    d = discover(model.double(), loss, batch)
    why = {r.site: r.reason for r in _reasons(d, "ln_bias_transfer")}
    # the embedding and attention-output LayerNorms also feed residual adds: a shift there is uncompensated
    assert "add" in why["layer_norm bert.embeddings.LayerNorm"], why
    assert "add" in why["layer_norm bert.encoder.layer.0.attention.output.LayerNorm"], why
    # the last one feeds only the pooler (the loss reads the classifier): exact
    f = _by_source(_found(d, "ln_bias_transfer"), "bert.encoder.layer.0.output.LayerNorm.bias")
    assert f.verdict == "exact", f.as_row()
    (v,) = _found(d, "value_bias_transfer")
    assert v.verdict == "exact" and v.transformation.source[0] == "bert.encoder.layer.0.attention.self.value.bias"


def test_llama_has_no_value_bias_and_says_so():
    model, loss, batch = ZOO["LlamaForCausalLM"]()
    d = discover(model, loss, batch)
    assert not _found(d, "value_bias_transfer")
    assert any("no bias" in r.reason for r in _reasons(d, "value_bias_transfer"))


# --------------------------------------------------------------------------------- ConvNeXt: the layer scale
def convnext(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    c = tf.ConvNextConfig(num_channels=3, patch_size=2, num_stages=1, hidden_sizes=[8], depths=[1], num_labels=3,
                          layer_scale_init_value=0.5, image_size=8)
    model = tf.ConvNextForImageClassification(c).double()
    with torch.no_grad():   # generic 1-d parameters (gains 1, biases 0 at init make symmetries degenerate)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    return model, lambda out, y: F.cross_entropy(out.logits, y), batch


def test_convnext_layer_scale_after_the_pointwise_linear_is_an_exact_diagonal_gl():
    model, loss, batch = convnext()
    d = discover(model, loss, batch)
    a = "convnext.encoder.stages.0.layers.0."
    (f,) = _found(d, "layer_scale_rescale")
    assert f.verdict == "exact" and f.transformation.n_generators == 8, f.as_row()
    assert f.residual_x3 <= f.tolerance, f.as_row()       # re-checked on images x3 by discovery itself
    assert set(f.transformation.params) == {a + "layer_scale_parameter", a + "pwconv2.weight", a + "pwconv2.bias"}
    s = torch.exp(_delta(8, 3))

    def edit(sign):
        def e(p):
            p[a + "layer_scale_parameter"] *= s
            p[a + "pwconv2.weight"] *= (s ** sign)[:, None]      # row c of W (out, in) and b_c: / s_c
            p[a + "pwconv2.bias"] *= s ** sign
        return e

    for b in (batch, (3 * batch[0], batch[1])):      # on the batch and on inputs x3
        r, level = loss_change(model, loss, b, edit(-1.0))
        assert r <= level, (r, level)
        r, level = loss_change(model, loss, b, edit(+1.0))   # negative: the wrong sign
        assert r > 1e3 * level, (r, level)
    # the LayerNorm (channels last, through the permute) feeds only pwconv1: its bias moves into pwconv1's
    t = _by_source(_found(d, "ln_bias_transfer"), a + "layernorm.bias")
    assert t.verdict == "exact" and t.transformation.readers[0][0] == a + "pwconv1.bias"
    # the stem's channels-first LayerNorm is read by a padded convolution: said why no transfer
    assert any("convolution" in r.reason for r in _reasons(d, "ln_bias_transfer"))


def test_dinov2_layer_scales_after_attention_and_mlp():
    import transformers as tf

    torch.manual_seed(0)
    c = tf.Dinov2Config(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, mlp_ratio=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3, layerscale_value=0.5)
    c._attn_implementation = "eager"
    model = tf.Dinov2ForImageClassification(c).double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    loss = lambda out, y: F.cross_entropy(out.logits, y)  # noqa: E731
    d = discover(model, loss, batch)
    fs = _found(d, "layer_scale_rescale")
    src = sorted(p for f in fs for p in f.transformation.params if "lambda1" in p)
    a = "dinov2.encoder.layer.0."
    assert src == [a + "layer_scale1.lambda1", a + "layer_scale2.lambda1"] and all(f.verdict == "exact" for f in fs)
    s = torch.exp(_delta(16, 4))

    # the map the scale follows, read off the finding (its name differs between transformers versions)
    (f1,) = [f for f in fs if a + "layer_scale1.lambda1" in f.transformation.params]
    (o_w,) = [p for p in f1.transformation.params if p.endswith(".weight")]
    o_b = o_w.removesuffix(".weight") + ".bias"
    assert o_b in f1.transformation.params and "attention" in o_w, f1.transformation.params

    def edit(sign):
        def e(p):
            p[a + "layer_scale1.lambda1"] *= s
            p[o_w] *= (s ** sign)[:, None]
            p[o_b] *= s ** sign
        return e

    r, level = loss_change(model, loss, batch, edit(-1.0))
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, edit(+1.0))
    assert r > 1e3 * level, (r, level)


# ----------------------------------------------------------------------- Gemma: (1 + w) gains, affine coordinates
def test_gemma_offset_gains_rescale_in_affine_coordinates():
    model, loss, batch = ZOO["GemmaForCausalLM"]()
    d = discover(model, loss, batch)
    fs = _found(d, "rms_offset_gain_rescale")
    a = "model.layers.0."
    by_w = {f.transformation.params[0]: f for f in fs}
    assert set(by_w) == {a + "input_layernorm.weight", a + "post_attention_layernorm.weight", "model.norm.weight"}
    assert all(f.verdict == "exact" and isinstance(f.transformation, OffsetScaleFamily) for f in fs), \
        [f.as_row() for f in fs]
    assert by_w[a + "input_layernorm.weight"].transformation.offsets == {a + "input_layernorm.weight": 1.0}
    # the plain gain rescale is still refused, with the reason naming the offset
    assert any("(1 + w)" in r.reason for r in d.rejected if r.family == "gain_rescale")
    s = torch.exp(_delta(32, 5))
    q, k, v = (a + f"self_attn.{x}_proj.weight" for x in "qkv")

    def edit(offset):
        def e(p):
            w = p[a + "input_layernorm.weight"]
            w.copy_(s * (w + offset) - offset)           # the effective gain (1 + w) scaled by s
            for n in (q, k, v):
                p[n] /= s[None, :]                       # each reader's input column c / s_c
        return e

    low = (torch.float32, 32)   # Gemma's RMSNorm and softmax run in float32 inside the float64 model
    r, level = loss_change(model, loss, batch, edit(1.0), low)
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, edit(0.0), low)   # negative: w scaled as if the gain were w
    assert r > 1e3 * level, (r, level)
    cands, _ = candidates(model, loss, batch)
    ctrls = [c for c in affine_family_controls(cands) if c.name.startswith("offset_ignored")]
    assert len(ctrls) == 3
    assert all(not c.holds for c in check_all(copy.deepcopy(model), loss, batch, ctrls, probes=1))


# ------------------------------------------------------------------------- the transformations themselves
def _tiny():
    """LayerNorm -> two linear readers -> sum: β transfer and an offset gain on a hand model."""
    torch.manual_seed(0)
    ln, l1, l2 = torch.nn.LayerNorm(4).double(), torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn(4, dtype=torch.float64)), ln.bias.add_(torch.randn(4, dtype=torch.float64))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.l1, self.l2 = ln, l1, l2

        def forward(self, x):
            y = self.ln(x)
            return torch.tanh(self.l1(y)) + self.l2(y)

    x = torch.randn(6, 4, dtype=torch.float64)
    return M(), F.cross_entropy, (x, torch.randint(0, 3, (6,)))


def test_bias_transfer_linear_part_passes_the_discrete_identities_and_json_round_trip():
    """(D1)/(D2) at a finite element exercise tangent (T_lin) and cotangent (T_lin^{-T}), which discovery's
    continuous checks do not; the family must survive the JSON registry unchanged."""
    model, loss, batch = _tiny()
    d = discover(model, loss, batch)
    (f,) = _found(d, "ln_bias_transfer")
    assert f.verdict == "exact" and len(f.transformation.readers) == 2, f.as_row()
    t = Transformation.from_json(f.transformation.to_json())
    assert t.to_json() == f.transformation.to_json()
    c = _delta(4, 6, scale=1.0)
    checks = check_all(model, loss, batch, [GroupElement(t, c, 0.7)], probes=2)
    assert [ch.order for ch in checks] == [0, 1, 2] and all(ch.holds for ch in checks), [ch.as_row() for ch in checks]
    # negative: the wrong sign fails orders 0-2 by far more than rounding
    bad = BiasTransferFamily("wrong", "negative_control", t.source, [r[:4] + [1.0] for r in t.readers], expected=False)
    for ch in check_all(model, loss, batch, [GroupElement(bad, c, 0.7)], probes=2):
        assert ch.residual > 1e3 * ch.tolerance, ch.as_row()


def test_offset_scale_family_identities_at_a_finite_element():
    """An (1 + w) gain written by hand, its readers' columns: the affine family passes orders 0-2 (continuous)
    and (D1)/(D2) at a finite element; with the offset dropped it fails them."""
    torch.manual_seed(1)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(4, 4).double()
            self.w = torch.nn.Parameter(0.3 * torch.randn(4, dtype=torch.float64))
            self.lin = torch.nn.Linear(4, 3).double()

        def forward(self, x):
            h = self.inp(x)                                  # (norms are read off parameter-dependent tensors)
            n = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            return self.lin(n * (1.0 + self.w))

    model = M()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    d = discover(model, F.cross_entropy, batch)
    (f,) = _found(d, "rms_offset_gain_rescale")
    assert f.verdict == "exact" and f.transformation.offsets == {"w": 1.0}, f.as_row()
    t = f.transformation
    c = _delta(4, 7, scale=1.0)
    for ch in check_all(model, F.cross_entropy, batch, [t, GroupElement(t, c, 0.7)], probes=2):
        assert ch.holds, ch.as_row()
    bad = OffsetScaleFamily("no_offset", "negative_control", t.generators, {}, expected=False)
    for ch in check_all(model, F.cross_entropy, batch, [bad], probes=2):
        assert ch.residual > 1e3 * ch.tolerance, ch.as_row()


def _bn_conv(padding, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 2, padding=padding),
                                torch.nn.Flatten(), torch.nn.LazyLinear(3)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model(x)   # materialise the lazy linear
    with torch.no_grad():
        model[1].bias.add_(torch.randn(3, dtype=torch.float64))
    return model, F.cross_entropy, (x, torch.randint(0, 3, (5,)))


def test_batchnorm_bias_into_an_unpadded_convolution_sums_its_kernel_and_a_padded_one_is_refused():
    model, loss, batch = _bn_conv(padding=0)
    d = discover(model, loss, batch)
    (f,) = _found(d, "bn_bias_transfer")
    assert f.verdict == "exact" and f.transformation.readers[0][:3] == ["2.bias", "2.weight", 1], f.as_row()
    delta = _delta(3, 8)

    def edit(sign):
        def e(p):
            p["1.bias"] += delta
            p["2.bias"] += sign * torch.einsum("oikl,i->o", p["2.weight"], delta)   # every tap meets δ
        return e

    for b in (batch, (3 * batch[0], batch[1])):
        r, level = loss_change(model, loss, b, edit(-1.0))
        assert r <= level, (r, level)
        r, level = loss_change(model, loss, b, edit(+1.0))
        assert r > 1e3 * level, (r, level)
    # (D1)/(D2) at a finite element: the transpose of the kernel sum (cotangent on a 4-d weight)
    checks = check_all(model, loss, batch, [GroupElement(f.transformation, delta, 0.7)], probes=2)
    assert all(ch.holds for ch in checks), [ch.as_row() for ch in checks]
    # zero padding: the border taps miss the shift, so nothing is proposed and the reason says so
    d = discover(*_bn_conv(padding=1))
    assert not _found(d, "bn_bias_transfer")
    assert any("padd" in r.reason for r in _reasons(d, "bn_bias_transfer"))
