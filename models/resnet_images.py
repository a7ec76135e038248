"""A ResNet (`transformers.ResNetForImageClassification`, from a config: BasicBlocks with BatchNorm and
ReLU) on the real digits (`eqlab.models.digit_images`), resampled to ``image_size`` (16 by default: the
stem halves it twice), one channel, 10 classes. No pretrained CNN weights are reachable offline.

BatchNorm runs with batch statistics (train mode), so every conv filter feeding a BN channel is scale
invariant up to eps / Var; the config has no eps, ``bn_eps`` sets every BatchNorm's (1e-20: the exact limit).
"""
from __future__ import annotations

import torch
from transformers import ResNetConfig, ResNetForImageClassification


def resnet_images(embedding=8, hidden_sizes=(8, 16), depths=(1, 1), image_size=16, bn_eps=1e-5, digit_set="all"):
    """``image_size`` and ``digit_set`` shape only the data (one option set per run)."""
    config = ResNetConfig(num_channels=1, embedding_size=embedding, hidden_sizes=list(hidden_sizes),
                          depths=list(depths), layer_type="basic", hidden_act="relu", num_labels=10,
                          downsample_in_first_stage=False)
    model = ResNetForImageClassification(config).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = bn_eps
    return model
