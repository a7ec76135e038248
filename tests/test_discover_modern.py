"""Attention on modern `transformers` classes from tiny configs: Qwen3 (per-head QK RMSNorm, grouped KV heads)
and GPT-NeoX (fused query_key_value, partial rotary). Each reported transformation gets an independent
few-line float64 check that it leaves the loss unchanged, and a negative control that breaks it.
Verdicts are three-way; the QK norm's eps makes the projections' scale invariance approximate, not exact;
every candidate considered and rejected is stored with its reason (`eqlab inspect --explain`)."""
import copy

import pyarrow.parquet as pq
import pytest
import torch

from eqlab.analyses.discover import discover, negative_controls
from eqlab.models.hf_tiny import _eager, last_token_ce
from eqlab.pipeline import inspect_cmd
from tests.test_discover_algebra import loss_change

torch.set_num_threads(1)
H, KV, DH, D = 4, 2, 4, 16          # Qwen3: query heads, key/value heads, head dim, hidden


def _batch(vocab=11, seq=5, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n,), generator=g)


def qwen3(eps=1e-6, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    c = _eager(tf.Qwen3Config(vocab_size=11, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1,
                              num_attention_heads=H, num_key_value_heads=KV, head_dim=DH, max_position_embeddings=20,
                              rms_norm_eps=eps, tie_word_embeddings=False, attention_dropout=0.0, bos_token_id=0,
                              eos_token_id=0, pad_token_id=None, initializer_range=0.3))
    model = tf.Qwen3ForCausalLM(c).double()
    with torch.no_grad():  # norm gains start at 1: make them generic so gain symmetries are not degenerate
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model, last_token_ce, _batch()


def neox(rotary=0.5, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    c = _eager(tf.GPTNeoXConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=20, rotary_pct=rotary,
                                attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False, bos_token_id=0,
                                eos_token_id=0, initializer_range=0.3, hidden_act="relu"))
    return tf.GPTNeoXForCausalLM(c).double(), last_token_ce, _batch()


def _one(d, family):
    (f,) = [f for f in d.found if f.transformation.family == family]
    return f


def _random_gl(m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(m, dtype=torch.float64) + 0.3 * torch.randn(m, m, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- Qwen3
def test_qwen3_vo_change_of_basis_per_kv_head_and_head_permutation():
    model, loss, batch = qwen3()
    d = discover(model, loss, batch)
    vo = _one(d, "vo_gl")
    assert vo.verdict == "exact" and vo.transformation.n_generators == KV * DH ** 2, vo.as_row()
    # one M per KV head: its v_proj rows and the o_proj columns of the H/KV query heads that read it
    assert [len(b) for b in vo.transformation.blocks] == [1 + H // KV] * KV
    assert _one(d, "head_permutation").verdict == "exact"
    a = "model.layers.0.self_attn."
    M = _random_gl(DH, 0)

    def vo_edit(query_heads):
        def edit(p):
            p[a + "v_proj.weight"][:DH] = M.T @ p[a + "v_proj.weight"][:DH]          # v_head0 -> v_head0 M
            for h in query_heads:                                                     # W_o[:, cols] M^{-T}
                cols = slice(h * DH, (h + 1) * DH)
                p[a + "o_proj.weight"][:, cols] = p[a + "o_proj.weight"][:, cols] @ torch.linalg.inv(M).T
        return edit

    r, level = loss_change(model, loss, batch, vo_edit([0, 1]))   # both query heads of KV head 0
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, vo_edit([0]))      # negative: one query head only (GQA)
    assert r > 1e3 * level, (r, level)


def test_qwen3_qk_norm_gain_rescale_respects_the_rotary_pairs():
    model, loss, batch = qwen3()
    d = discover(model, loss, batch)
    g = _one(d, "qk_norm_gain_rescale")
    assert g.verdict == "exact", g.as_row()
    # RoPE rotates dims (i, i + DH/2) together: one generator per pair, acting on both in q and in k
    assert g.transformation.n_generators == DH // 2
    assert sorted(sorted(gen[0][2]) for gen in g.transformation.generators) == [[0, 2], [1, 3]]
    a = "model.layers.0.self_attn."

    def gain_edit(dims):
        def edit(p):
            p[a + "q_norm.weight"][dims] *= 2.0
            p[a + "k_norm.weight"][dims] /= 2.0
        return edit

    r, level = loss_change(model, loss, batch, gain_edit([0, 2]))
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, gain_edit([0]))    # negative: splits a rotary pair
    assert r > 1e3 * level, (r, level)


def test_qwen3_projection_scale_through_the_qk_norm_is_approximate_by_its_eps():
    model, loss, batch = qwen3(eps=1e-6)
    d = discover(model, loss, batch)
    qs = [f for f in d.found if f.transformation.family == "rms_scale"]
    assert len(qs) == 2 and all(f.verdict == "approximate" and f.cause == "eps" for f in qs), [f.as_row() for f in qs]
    assert all("eps=1e-06" in f.reason and "predicted" in f.reason for f in qs)
    # the same physics as a LayerNorm stream: the eps-free model makes the same transformations exact
    # (within the rounding level of the float32 ops HF's RMSNorm runs inside the float64 model)
    d0 = discover(*qwen3(eps=0.0))
    assert all(f.verdict == "exact" for f in d0.found if f.transformation.family == "rms_scale")
    # per head too: the norm divides each head's row by its own rms (H query heads, KV key heads)
    heads = {f.transformation.name.split("[")[1].split(".")[-1][:-1]: f for f in d.found
             if f.transformation.family == "qk_norm_head_scale"}
    assert heads["q_proj"].transformation.n_generators == H and heads["k_proj"].transformation.n_generators == KV
    assert all(f.verdict == "approximate" and f.cause == "eps" for f in heads.values())
    assert all(f.verdict == "exact" for f in d0.found if f.transformation.family == "qk_norm_head_scale")
    m0 = qwen3(eps=0.0)[0]
    low = (torch.float32, DH)    # HF's RMSNorm runs in float32 inside the float64 model, over d_head entries
    q = "model.layers.0.self_attn.q_proj.weight"
    r, level = loss_change(m0, loss, batch, lambda p: p[q][DH:2 * DH].mul_(2.0), low)      # head 1 alone x 2
    assert r <= level, (r, level)
    r, level = loss_change(m0, loss, batch, lambda p: p[q][DH:2 * DH].mul_(-1.0), low)     # negative: x (−1)
    assert r > 1e3 * level, (r, level)
    # independent check of the size: scaling q_proj by 2 moves the loss by ~eps/mean(q²), not 0
    moved = lambda p: p["model.layers.0.self_attn.q_proj.weight"].mul_(2.0)  # noqa: E731
    # (the eps-free model's change is float32 rounding inside its RMSNorm: the eps effect is 10x above it)
    r, level = loss_change(model, loss, batch, moved)
    r0, _ = loss_change(qwen3(eps=0.0)[0], loss, batch, moved)
    assert r > 10 * r0 and r > 1e3 * level, (r, r0, level)


def test_inspections_store_a_reason_for_every_rejected_candidate(tmp_path):
    model, loss, batch = qwen3()
    rows = inspect_cmd.inspection_rows(discover(model, loss, batch))
    path = inspect_cmd.write_inspection(rows, tmp_path, "qwen3_tiny.py:make")
    back = pq.read_table(path).to_pylist()
    assert len(back) == len(rows)
    rejected = [r for r in back if r["verdict"] == "not_proposed"]
    assert rejected and all(r["reason"] and r["site"] and not r["holds"] for r in rejected)
    # the full GL of Q/K cannot pass the per-head QK norm's gain: said, not silently dropped
    assert any(r["symmetry"] == "qk_gl" and "norm" in r["reason"] for r in rejected), rejected
    found = [r for r in back if r["verdict"] != "not_proposed"]
    assert {r["verdict"] for r in found} == {"exact", "approximate", "broken"}
    assert all(r["holds"] == (r["verdict"] == "exact") for r in found)
    assert all(r["rounding_level"] > 0 for r in found)
    text = inspect_cmd.format_inspection("qwen3", rows, explain=True)
    assert "considered and not proposed" in text and "qk_gl: Q/K" in text
    assert "considered" not in inspect_cmd.format_inspection("qwen3", rows)


# ---------------------------------------------------------------------------------------------- GPT-NeoX
@pytest.mark.parametrize("rotary", [0.5, 1.0])
def test_neox_fused_qkv_partial_rotary_commutant(rotary):
    model, loss, batch = neox(rotary)
    heads, dh = 2, 8
    rot = int(dh * rotary)
    d = discover(model, loss, batch)
    qk = _one(d, "qk_commutant")
    # per head: aI + bJ on each rotary frequency pair (2 per pair) and all of GL on the non-rotary dims
    assert qk.verdict == "exact" and qk.transformation.n_generators == heads * (rot + (dh - rot) ** 2), qk.as_row()
    full = _one(d, "qk_gl")
    assert full.verdict == "broken" and "rotary" in full.reason
    vo = _one(d, "vo_gl")
    assert vo.verdict == "exact" and vo.transformation.n_generators == heads * dh ** 2
    assert _one(d, "head_permutation").verdict == "exact"


def test_neox_non_rotary_dims_keep_their_full_gl():
    model, loss, batch = neox(0.5)
    dh, rot = 8, 4
    w, b = "gpt_neox.layers.0.attention.query_key_value.weight", "gpt_neox.layers.0.attention.query_key_value.bias"
    M = _random_gl(dh - rot, 1)

    def qk_edit(dims):  # head 0 of the fused layout [q | k | v] per head: q dims ↦ q M, k dims ↦ k M^{-T}
        q, k = [i for i in dims], [dh + i for i in dims]
        def edit(p):
            for name in (w, b):
                p[name][q] = M.T @ p[name][q]
                p[name][k] = torch.linalg.inv(M) @ p[name][k]
        return edit

    r, level = loss_change(model, loss, batch, qk_edit(list(range(rot, dh))))
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, qk_edit(list(range(rot))))   # negative: on the rotary dims
    assert r > 1e3 * level, (r, level)


# ------------------------------------------------------------------------------- Falcon (MQA), Mixtral (MoE)
def test_falcon_multi_query_attention_through_x_at_weight_transpose():
    from eqlab.analyses.discover.zoo import ZOO

    model, loss, batch = ZOO["FalconForCausalLM"]()      # 4 query heads, one K/V head, x @ W.T projections
    d = discover(model, loss, batch)
    dh = model.config.hidden_size // model.config.num_attention_heads
    vo = _one(d, "vo_gl")
    assert vo.verdict == "exact" and vo.transformation.n_generators == dh ** 2, vo.as_row()
    assert [len(b) for b in vo.transformation.blocks] == [1 + 4]  # the one V head and all four O slices
    assert _one(d, "qk_commutant").transformation.n_generators == dh   # RoPE pairs of the one K head
    assert _one(d, "head_permutation").verdict == "exact"
    # independent check: fused [q heads | k | v] rows; M on the V rows needs M^{-T} on every head's O slice
    H, D = 4, model.config.hidden_size
    w, o = "transformer.h.0.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight"
    v_rows = slice(H * dh + dh, H * dh + 2 * dh)
    M = _random_gl(dh, 2)

    def edit(heads):
        def e(p):
            p[w][v_rows] = M.T @ p[w][v_rows]
            for h in heads:
                p[o][:, h * dh:(h + 1) * dh] = p[o][:, h * dh:(h + 1) * dh] @ torch.linalg.inv(M).T
        return e

    r, level = loss_change(model, loss, batch, edit(range(H)))
    assert r <= level and D == H * dh, (r, level)
    r, level = loss_change(model, loss, batch, edit(range(H - 1)))   # negative: one O slice left out
    assert r > 1e3 * level, (r, level)


def test_mixtral_experts_written_with_index_add_are_used_and_the_router_shift_is_exact():
    from eqlab.analyses.discover.zoo import ZOO

    model, loss, batch = ZOO["MixtralForCausalLM"]()
    d = discover(model, loss, batch)
    # the experts accumulate into their output with an in-place index_add_: the graph follows the mutation
    assert "unused_parameter" not in d.families(verified_only=False)
    router = [f for f in d.found if f.transformation.family == "softmax_translation" and "gate" in f.transformation.name]
    assert len(router) == 1 and router[0].verdict == "exact", [f.as_row() for f in d.found]
    g = "model.layers.0.mlp.gate.weight"
    shift = torch.randn(model.config.hidden_size, dtype=torch.float64)

    def edit(rows):
        def e(p):
            p[g][rows] += shift       # the same vector added to these experts' router rows
        return e

    E = model.config.num_local_experts
    low = (torch.float32, E)   # Mixtral takes the router softmax in float32 inside the float64 model
    r, level = loss_change(model, loss, batch, edit(list(range(E))), low)  # every expert: softmax, top-k keep
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, edit([0]), low)             # negative: one expert only
    assert r > 1e3 * level, (r, level)


def test_gemma2_attention_through_the_logit_softcap_and_offset_gains_explained():
    from eqlab.analyses.discover.zoo import ZOO

    model, loss, batch = ZOO["Gemma2ForCausalLM"]()   # scores -> c·tanh(s/c) -> softmax; RMSNorm gain (1 + w)
    assert model.config.attn_logit_softcapping
    d = discover(model, loss, batch)
    dh, kv = model.config.head_dim, model.config.num_key_value_heads
    qk = _one(d, "qk_commutant")
    assert qk.verdict == "exact" and qk.transformation.n_generators == kv * dh, qk.as_row()
    assert _one(d, "vo_gl").verdict == "exact" and _one(d, "head_permutation").verdict == "exact"
    gains = [r for r in d.rejected if r.family == "gain_rescale"]
    assert gains and all("(1 + w)" in r.reason for r in gains)
    # independent check: q rows of KV group 0 (query heads 0, 1) x 3, k rows of KV head 0 / 3 keep every
    # q·k, so the softcap sees the same scores; q alone changes them, and the softcap does not hide it
    a = "model.layers.0.self_attn."

    def edit(k_too):
        def e(p):
            p[a + "q_proj.weight"][: 2 * dh] *= 3.0
            if k_too:
                p[a + "k_proj.weight"][:dh] /= 3.0
        return e

    low = (torch.float32, batch[0].shape[1])   # Gemma 2's eager softmax runs in float32
    r, level = loss_change(model, loss, batch, edit(True), low)
    assert r <= level, (r, level)
    r, level = loss_change(model, loss, batch, edit(False), low)
    assert r > 1e3 * level, (r, level)


# ------------------------------------------------------------------- the zoo: every verdict, checked on its own
@pytest.mark.parametrize("cls", ["GemmaForCausalLM", "PhiForCausalLM", "Olmo2ForCausalLM", "LlamaForCausalLM",
                                 "Qwen2ForCausalLM", "GPT2LMHeadModel"])
def test_zoo_exact_findings_leave_the_loss_unchanged_and_broken_ones_do_not(cls):
    """Each class of `analyses.discover.zoo` (1 layer, hidden 32): a finite element of every exact finding,
    applied to a copy of the model, leaves the float64 loss within its rounding level; every finding broken
    by the algebra (a non-homogeneous activation) or by rotary (the full Q/K GL) moves it far above it."""
    from eqlab.analyses.discover.zoo import HIDDEN, ZOO
    from eqlab.analyses.transforms import Continuous, GroupElement

    model, loss, batch = ZOO[cls]()
    d = discover(model, loss, batch)
    gen = torch.Generator().manual_seed(0)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    # HF runs softmax / RMSNorm in float32 inside a float64 model: their rounding, over ≤ HIDDEN entries
    low = (torch.float32, HIDDEN)

    def element(t):
        return GroupElement(t, t.random_coeffs(gen, theta), 0.5) if isinstance(t, Continuous) else t

    def edit_for(T):
        def e(p):
            for n, v in T.apply({n: p[n].detach().clone() for n in T.params}).items():
                p[n].copy_(v)
        return e

    checked = {"exact": 0, "broken": 0}
    for f in d.found:
        T = element(f.transformation)
        if getattr(T, "output_scale", None) is not None or getattr(T, "loss_scale", 1.0) != 1.0:
            continue   # homogeneity: an equivariance, the loss is not invariant
        if f.verdict == "exact":
            r, level = loss_change(model, loss, batch, edit_for(T), low)
            assert r <= level, (f.transformation.name, r, level)
            checked["exact"] += 1
        elif f.verdict == "broken" and f.cause in ("algebra", "caveat", "shared", "rotary", "fixed_bias"):
            r, level = loss_change(model, loss, batch, edit_for(T), low)
            # negative: broken really moves it — 100x over a level that already grants float32 rounding
            assert r > 100 * level, (f.transformation.name, r, level)
            checked["broken"] += 1
    for t in negative_controls(model, loss, batch):   # declared non-symmetries (a one-class logit shift, ...)
        r, level = loss_change(model, loss, batch, edit_for(element(t)), low)
        assert r > 100 * level, (t.name, r, level)
        checked["broken"] += 1
    assert checked["exact"] >= 5 and checked["broken"] >= 1, checked
