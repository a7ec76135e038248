"""A tiny pre-LayerNorm transformer (`transformers.GPT2LMHeadModel`, built from a config) on a + b mod p.

Inputs are the three tokens ``[a, b, =]``; the loss is cross-entropy of the prediction at ``=``.
Attention is eager because SDPA on the CPU has neither double backward nor forward-mode AD.
The unembedding is untied: a tied one breaks softmax translation (the shift would move the inputs).
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def modadd_gpt2(p=13, n_embd=32, n_layer=1, n_head=2, activation="relu", layer_norm_epsilon=1e-5,
                tie_word_embeddings=False):
    config = GPT2Config(
        vocab_size=p + 1, n_positions=3, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=4 * n_embd, activation_function=activation, layer_norm_epsilon=layer_norm_epsilon,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=p, eos_token_id=p,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def modadd_data(p=13, seed=0, train_fraction=0.6, dtype=torch.float32):
    """All p*p pairs, split once with a fixed permutation; ``dtype`` is unused (tokens are integers)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    X = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(y)))
    train, test = perm[:n_train], perm[n_train:]
    return (X[train], y[train]), (X[test], y[test])
