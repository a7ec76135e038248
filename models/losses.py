"""Losses written so that both double backward and forward-over-reverse differentiate them.

`F.mse_loss(reduction="mean")` breaks forward-over-reverse on torch 2.13 (pytorch#123996), so squared
error is written out. Every loss is the mean over examples: the Hessian operator relies on that to
turn per-shard sums into the full-batch mean.
"""
import torch
import torch.nn.functional as F


def logits_of(outputs) -> torch.Tensor:
    """Logits from a plain tensor or a `transformers` ModelOutput."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


def cross_entropy(outputs, targets) -> torch.Tensor:
    return F.cross_entropy(logits_of(outputs), targets)


def last_token_cross_entropy(outputs, targets) -> torch.Tensor:
    """Cross-entropy of the prediction made at the last position of a sequence model."""
    return F.cross_entropy(logits_of(outputs)[:, -1, :], targets)


def squared_error(outputs, targets) -> torch.Tensor:
    diff = logits_of(outputs) - targets
    return 0.5 * diff.pow(2).flatten(1).sum(1).mean()


def accuracy(outputs, targets) -> float:
    logits = logits_of(outputs)
    if logits.dim() == 3 and targets.dim() == 1:  # a last-token task; (n, seq) targets: per-token accuracy
        logits = logits[:, -1, :]
    return (logits.argmax(-1) == targets).double().mean().item()
