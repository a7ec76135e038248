"""A ViT (`transformers.ViTForImageClassification`, from a config) on the real digits
(`eqlab.models.digit_images`), one channel, 10 classes.

Pre-LayerNorm blocks, a [CLS] token read by a linear head. Eager attention, no dropout. ``activation``
defaults to ReLU (MLP-neuron rescale symmetry); "gelu" is ViT's own and breaks it.
"""
from __future__ import annotations

from transformers import ViTConfig, ViTForImageClassification


def vit_images(n_layer=1, hidden=32, n_head=2, intermediate=64, patch=4, image_size=8, activation="relu",
               layer_norm_eps=1e-12, digit_set="all"):
    """``digit_set`` shapes only the data (one option set per run)."""
    config = ViTConfig(image_size=image_size, patch_size=patch, num_channels=1, hidden_size=hidden,
                       num_hidden_layers=n_layer, num_attention_heads=n_head, intermediate_size=intermediate,
                       hidden_act=activation, layer_norm_eps=layer_norm_eps, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    return ViTForImageClassification(config)
