"""The benchmark's problems: one model, one loss, fixed batches, identical for every library.

Every model is wrapped so that ``model(X)`` returns a plain logits tensor and the loss is a plain
``nn.CrossEntropyLoss()`` (mean reduction). That is the one interface all four libraries accept
(curvlinops reads ``loss_func.reduction``; PyHessian calls ``criterion(model(X), y)``), so every
library differentiates exactly the same function.

BatchNorm: the digits CNN is trained in train mode, then analysed in **eval mode** (BN frozen to its
running statistics, a fixed affine map). PyHessian forces ``model.eval()`` internally, and with frozen
BN a list of batches is the same function as their concatenation, so the batch-weighting test is
well defined for every library. (B.3 of shared/peers.md: "no BN in train mode, or BN frozen".)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqlab.models import build_task

# Sized so the dense float64 Hessians build in ~2 min on a 2-core machine shared with other jobs.
CNN_OPTIONS = {"channels": (2, 4), "hidden": 8}
GPT_OPTIONS = {"p": 11, "n_embd": 8, "n_head": 2}
ALL_DIGITS_SPLIT = (600, 500, 400, 297)  # 4 unequal batches over all 1797 digits (tests batch weighting)


class LastLogits(nn.Module):
    """GPT-2 LM head -> logits at the '=' position, so the loss is plain cross-entropy on a tensor."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        return self.gpt(x).logits[:, -1, :]


@dataclass
class Problem:
    name: str
    model: nn.Module          # eval mode, float64 (convert copies for float32 speed runs)
    batches: list             # [(X, y), ...] defining the Hessian (example-weighted mean loss)
    blocks: dict              # block name -> parameter names (one block per layer)
    loss_module: nn.Module | None = None  # None: plain nn.CrossEntropyLoss() (mean reduction)

    @property
    def loss(self):
        return nn.CrossEntropyLoss() if self.loss_module is None else self.loss_module

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def cast(self, dtype) -> "Problem":
        """The same problem in another dtype (a converted copy of the model and the inputs)."""
        import copy
        model = copy.deepcopy(self.model).to(dtype)
        batches = [(X.to(dtype) if X.is_floating_point() else X, y.to(dtype) if y.is_floating_point() else y)
                   for X, y in self.batches]
        return Problem(self.name, model, batches, self.blocks, self.loss_module)


def layer_blocks(model: nn.Module) -> dict:
    """One block per module that owns parameters directly (weight and bias of a layer together)."""
    blocks = {}
    for mname, m in model.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)]
        if own:
            blocks[mname or "<root>"] = own
    return blocks


def _train(model, loss, X, y, steps, opt, batch, seed):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        loss(model(X[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return model


def digits_cnn(seed: int = 0) -> tuple[Problem, Problem]:
    """(512-example problem, all-1797-in-4-unequal-batches problem), same trained weights."""
    task = build_task("digits_cnn", CNN_OPTIONS, seed=seed, dtype=torch.float32)
    Xtr, ytr = task.train
    _train(task.model, nn.CrossEntropyLoss(), Xtr, ytr, steps=200,
           opt=torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9), batch=64, seed=seed)
    model = task.model.double().eval()
    X = torch.cat([task.train[0], task.test[0]]).double()  # all 1797 digits
    y = torch.cat([task.train[1], task.test[1]])
    blocks = layer_blocks(model)
    one = Problem("cnn_b512", model, [(Xtr[:512].double(), ytr[:512])], blocks)
    cuts, start, parts = ALL_DIGITS_SPLIT, 0, []
    for n in cuts:
        parts.append((X[start:start + n], y[start:start + n]))
        start += n
    return one, Problem("cnn_all1797", model, parts, blocks)


def modadd_transformer(seed: int = 0) -> Problem:
    """1-layer pre-LN GPT-2 on a + b mod 11, trained 300 Adam steps, Hessian on its training pairs."""
    task = build_task("modadd_gpt2", GPT_OPTIONS, seed=seed, dtype=torch.float32)
    model = LastLogits(task.model)
    X, y = task.train
    _train(model, nn.CrossEntropyLoss(), X, y, steps=300,
           opt=torch.optim.Adam(model.parameters(), lr=3e-3), batch=len(y), seed=seed)
    model = model.double().eval()
    return Problem("gpt2_modadd", model, [(X, y)], layer_blocks(model))
