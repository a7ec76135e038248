"""Llama-family `transformers` classes (RMSNorm, rotary attention, SwiGLU, no biases) from tiny configs:
(model, loss, batch) like models.hf_tiny. Eager attention, no dropout, untied lm_head unless asked; weights
at std 0.3 (not 0.02) so that attention is far from uniform and Q/K controls have something to break."""
from __future__ import annotations

import torch

from eqlab.models.hf_tiny import _eager, last_token_ce


def _batch(vocab, seq, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n,), generator=g)


def _config(cls, vocab, hidden, layers, heads, kv_heads, seq, eps, tie, act, **kw):
    return _eager(cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4 * seq,
                      rms_norm_eps=eps, tie_word_embeddings=tie, hidden_act=act, attention_dropout=0.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None, initializer_range=0.3, **kw))


def llama(family="llama", n_layer=1, n_head=4, n_kv_head=2, hidden=16, vocab=11, seq=5, n=8, eps=1e-6,
          tie=False, activation="silu", seed=0):
    """family: "llama", "qwen2" (q/k/v biases) or "mistral". ``eps`` is the RMSNorm eps (0 is allowed)."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    torch.manual_seed(seed)
    c = _config(cls[0], vocab, hidden, n_layer, n_head, n_kv_head, seq, eps, tie, activation,
                **({"head_dim": hidden // n_head} if family != "qwen2" else {}))
    model = cls[1](c)
    with torch.no_grad():  # RMSNorm gains start at 1: make them generic so gain symmetries are not degenerate
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model, last_token_ce, _batch(vocab, seq, n, seed)
