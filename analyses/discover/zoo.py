"""Tiny configs of `transformers` classes, one per mechanism discovery must read (for the architecture x
symmetry table and the speed check): ``ZOO[name]() -> (model, loss, batch)``, float64, eager attention, no
dropout, 1 layer, hidden 32. Weights at std 0.3 (not 0.02) so that attention is far from uniform."""
from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN, LAYERS, HEADS = 32, 1, 4


def _ids(vocab=11, seq=5, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n,), generator=g)


def _last_token_ce(out, y):
    return F.cross_entropy(out.logits[:, -1], y)


def _ce(out, y):
    return F.cross_entropy(out.logits, y)


def _common(**kw):
    return dict(vocab_size=11, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=20, tie_word_embeddings=False, bos_token_id=0,
                eos_token_id=0, pad_token_id=None, initializer_range=0.3, **kw)


def _build(config, model_cls, loss=_last_token_ce, batch=None, seed=0):
    config._attn_implementation = "eager"        # SDPA has no double backward on the CPU
    config._experts_implementation = "eager"     # MoE: the per-expert loop (grouped_mm has no float64)
    torch.manual_seed(seed)
    model = model_cls(config).double()
    with torch.no_grad():  # norm gains start at 1: make them generic so gain symmetries are not degenerate
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model, loss, batch if batch is not None else _ids()


def _lm(cfg, cls, **kw):
    import transformers as tf

    return lambda: _build(getattr(tf, cfg)(**_common(**kw)), getattr(tf, cls))


def _mobilevit():
    import transformers as tf

    c = tf.MobileViTConfig(image_size=32, patch_size=2, num_channels=3, hidden_sizes=[16, 16, 16],
                           neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], num_attention_heads=2, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    return _build(c, tf.MobileViTForImageClassification, _ce, batch)


def _gpt2():
    import transformers as tf

    c = tf.GPT2Config(vocab_size=11, n_positions=20, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=2 * HIDDEN,
                      activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    return _build(c, tf.GPT2LMHeadModel)


def _images(n=4, channels=3, size=8, labels=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, channels, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, labels, (n,), generator=g))


def _convnext():
    import transformers as tf   # depthwise 7x7 conv, channels-last LayerNorm, layer scale after pwconv2

    c = tf.ConvNextConfig(num_channels=3, patch_size=2, num_stages=1, hidden_sizes=[HIDDEN], depths=[LAYERS],
                          num_labels=3, layer_scale_init_value=0.5, image_size=8)
    return _build(c, tf.ConvNextForImageClassification, _ce, _images())


def _dinov2():
    import transformers as tf   # pre-LN ViT with layer scales after attention and MLP

    c = tf.Dinov2Config(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, mlp_ratio=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3, layerscale_value=0.5, initializer_range=0.3)
    return _build(c, tf.Dinov2ForImageClassification, _ce, _images())


def _bert():
    import transformers as tf   # post-LN: LayerNorms read by residual adds

    c = tf.BertConfig(vocab_size=11, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      intermediate_size=2 * HIDDEN, max_position_embeddings=20, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=3, initializer_range=0.3)
    ids, _ = _ids()
    return _build(c, tf.BertForSequenceClassification, _ce, (ids, torch.randint(0, 3, (ids.shape[0],))))


def _gpt2_tied():
    import transformers as tf   # lm_head.weight is transformer.wte.weight: one parameter, two uses

    c = tf.GPT2Config(vocab_size=11, n_positions=20, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=2 * HIDDEN,
                      activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    return _build(c, tf.GPT2LMHeadModel)


def _t5_hidden_ce(out, y):
    return F.cross_entropy(out.last_hidden_state[:, -1, :11], y)


def _t5(layers=LAYERS):
    import transformers as tf   # learned relative-position bias: an (buckets, heads) embedding added to the scores
    # (computed in the first block, reused by every later one: a head permutation must move all blocks at once)

    c = tf.T5Config(vocab_size=11, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=layers,
                    num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=False, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)
    return _build(c, tf.T5EncoderModel, _t5_hidden_ce, _ids())


def _swin():
    import transformers as tf   # windowed attention with a relative position bias table (entries, heads)

    c = tf.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=16, depths=[1], num_heads=[4],
                      window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      drop_path_rate=0.0, num_labels=3, initializer_range=0.3)
    model, loss, batch = _build(c, tf.SwinForImageClassification, _ce, _images())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the table starts at zero: give each head its own bias so that its columns matter
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, loss, batch


ZOO = {
    "GPT2LMHeadModel": _gpt2,
    "LlamaForCausalLM": _lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "Qwen2ForCausalLM": _lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "Qwen3ForCausalLM": _lm("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8),
    "GPTNeoXForCausalLM": _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.25, hidden_dropout=0.0,
                              attention_dropout=0.0),
    "GemmaForCausalLM": _lm("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8),
    "Gemma2ForCausalLM": _lm("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8),
    "PhiForCausalLM": _lm("PhiConfig", "PhiForCausalLM", resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "FalconForCausalLM": _lm("FalconConfig", "FalconForCausalLM", hidden_dropout=0.0, attention_dropout=0.0),
    "Olmo2ForCausalLM": _lm("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2),
    "MixtralForCausalLM": _lm("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2),
    "FalconForCausalLM(alibi)": _lm("FalconConfig", "FalconForCausalLM", alibi=True, multi_query=False,
                                    hidden_dropout=0.0, attention_dropout=0.0),
    "Qwen3MoeForCausalLM": _lm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=8,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN,
                               norm_topk_prob=True, decoder_sparse_step=1),
    "GPT2LMHeadModel(tied)": _gpt2_tied,
    "T5EncoderModel": _t5,
    "T5EncoderModel(2 layers)": lambda: _t5(layers=2),
    "SwinForImageClassification": _swin,
    "MobileViTForImageClassification": _mobilevit,
    "BertForSequenceClassification": _bert,
    "ConvNextForImageClassification": _convnext,
    "Dinov2ForImageClassification": _dinov2,
}
