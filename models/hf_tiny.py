"""Real `transformers` classes from tiny configs, each with a loss and a fixed batch: (model, loss, batch).

Eager attention (SDPA on the CPU has neither double backward nor forward-mode AD) and no dropout, so the
loss is a deterministic function of the parameters. Sizes are chosen so that a float64 HVP takes
milliseconds: the point is the *classes* (their op graphs), not their scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _eager(config):
    config._attn_implementation = "eager"
    return config


def last_token_ce(out, y):
    return F.cross_entropy(out.logits[:, -1], y)


def ce(out, y):
    return F.cross_entropy(out.logits, y)


def half_mean_square_hidden(out, y):
    """A headless loss on the final hidden states (BERT's pooler is then unused)."""
    return 0.5 * out.last_hidden_state.pow(2).mean()


def gpt2(n_layer=2, n_head=2, n_embd=16, vocab=11, seq=5, n=8, activation="relu", tie=False,
         layer_norm_epsilon=1e-5, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    c = _eager(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                          n_inner=2 * n_embd, activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, tie_word_embeddings=tie, layer_norm_epsilon=layer_norm_epsilon,
                          bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n,), generator=g))
    return GPT2LMHeadModel(c), last_token_ce, batch


def _bert_config(n_layer, n_head, hidden, vocab, seq, activation, **kw):
    from transformers import BertConfig

    return _eager(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer,
                             num_attention_heads=n_head, intermediate_size=2 * hidden, max_position_embeddings=seq,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2,
                             hidden_act=activation, **kw))


def bert_classifier(n_layer=2, n_head=2, hidden=16, vocab=11, seq=5, n=8, labels=3, activation="relu", seed=0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    m = BertForSequenceClassification(_bert_config(n_layer, n_head, hidden, vocab, seq, activation,
                                                   num_labels=labels))
    g = torch.Generator().manual_seed(seed)
    batch = ({"input_ids": torch.randint(0, vocab, (n, seq), generator=g)}, torch.randint(0, labels, (n,), generator=g))
    return m, ce, batch


def bert_headless(n_layer=1, n_head=2, hidden=16, vocab=11, seq=5, n=8, activation="relu", seed=0):
    from transformers import BertModel

    torch.manual_seed(seed)
    m = BertModel(_bert_config(n_layer, n_head, hidden, vocab, seq, activation))
    g = torch.Generator().manual_seed(seed)
    return m, half_mean_square_hidden, ({"input_ids": torch.randint(0, vocab, (n, seq), generator=g)}, torch.zeros(n))


def vit(n_layer=1, n_head=2, hidden=16, image=8, patch=4, n=8, labels=3, activation="relu", seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    c = _eager(ViTConfig(image_size=image, patch_size=patch, num_channels=1, hidden_size=hidden,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, intermediate_size=2 * hidden,
                         num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         hidden_act=activation))
    g = torch.Generator().manual_seed(seed)
    batch = ({"pixel_values": torch.randn(n, 1, image, image, generator=g)}, torch.randint(0, labels, (n,), generator=g))
    return ViTForImageClassification(c), ce, batch


def resnet(hidden_sizes=(4, 8), embedding=4, image=16, n=8, labels=3, bn_eps=None, seed=0):
    """BasicBlock ResNet, BN in train mode (batch statistics). ``bn_eps`` overrides every BatchNorm's eps
    (the config has no such option), e.g. 1e-12 to make the BN scale symmetry exact to float64 roundoff."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    c = ResNetConfig(num_channels=1, embedding_size=embedding, hidden_sizes=list(hidden_sizes),
                     depths=[1] * len(hidden_sizes), layer_type="basic", hidden_act="relu", num_labels=labels,
                     downsample_in_first_stage=False)
    m = ResNetForImageClassification(c).train()
    if bn_eps is not None:
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eps = bn_eps
    g = torch.Generator().manual_seed(seed)
    batch = ({"pixel_values": torch.randn(n, 1, image, image, generator=g)}, torch.randint(0, labels, (n,), generator=g))
    return m, ce, batch
