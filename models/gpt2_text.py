"""A GPT-2 (`transformers.GPT2LMHeadModel`, from a config) as a byte-level causal LM on stdlib prose.

GPT-2's own architecture (pre-LayerNorm blocks, learned positions, 4·n_embd MLP); the 50257-token BPE
is not available offline, so the vocabulary is the 256 bytes (`eqlab.models.byte_lm`). GPT-2 small's
shape is ``n_layer=12, n_embd=768, n_head=12, seq_len=1024`` (86,235,648 parameters with this vocabulary, untied).
Eager attention and no dropout (double backward; a deterministic loss). ``activation`` defaults to
ReLU, whose positive homogeneity gives the MLP-neuron rescale symmetry; "gelu_new" is GPT-2's own and
breaks it (a measured violation). ``layer_norm_epsilon`` = 0 makes the
residual-stream scale symmetry exact. The unembedding is untied by default: a tied one moves the inputs
under a logit shift, which breaks softmax translation.
"""
from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from eqlab.models.byte_lm import VOCAB


def gpt2_text(n_layer=1, n_embd=32, n_head=2, seq_len=32, activation="relu", layer_norm_epsilon=1e-5,
              tie_word_embeddings=False, n_train=64, n_test=32):
    """``n_train``/``n_test`` shape only the data (one option set per run)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_inner=4 * n_embd, activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=layer_norm_epsilon, tie_word_embeddings=tie_word_embeddings, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)
