"""A Llama (`transformers.LlamaForCausalLM`, from a config: RMSNorm, rotary positions, SwiGLU MLP, no
biases) as a byte-level causal LM on stdlib prose (`eqlab.models.byte_lm`, the same data as gpt2_text).

Eager attention, no dropout, untied unembedding by default. ``n_kv_head`` < ``n_head`` is grouped-query
attention. ``rms_norm_eps`` is the RMSNorm epsilon: each gain-times-next-weight rescale is exact only in
the eps → 0 limit, so exact-identity studies set it to 0 (torch's RMSNorm allows it).
``initializer_range`` is the weights' init std (Llama's own 0.02 leaves near-uniform next-byte logits, under
which a one-class logit shift barely moves the gradient; 0.1 gives its negative control room at every
order above HF Llama's float32 softmax rounding).
"""
from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from eqlab.models.byte_lm import VOCAB


def llama_text(n_layer=1, hidden=32, n_head=4, n_kv_head=2, intermediate=64, seq_len=32, rms_norm_eps=1e-6,
               tie_word_embeddings=False, initializer_range=0.02, n_train=64, n_test=32):
    """``n_train``/``n_test`` shape only the data (one option set per run)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                         head_dim=hidden // n_head, max_position_embeddings=seq_len, rms_norm_eps=rms_norm_eps,
                         tie_word_embeddings=tie_word_embeddings, hidden_act="silu", attention_dropout=0.0,
                         bos_token_id=0, eos_token_id=0, pad_token_id=None,
                         initializer_range=initializer_range)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)
