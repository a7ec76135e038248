"""The loss as a function of a dict of named parameters, and its exact first and second derivatives.

Everything in `analyses/` speaks in *parameter dicts* ``{name: tensor}`` keyed like
``model.named_parameters()``. Parameters that a dict leaves out are read from the module unchanged,
so a function can act on any named subset (a block) without the user flattening the model.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

ParamDict = dict[str, Tensor]
LossFn = Callable[[object, Tensor], Tensor]  # (model outputs, targets) -> scalar mean loss


def forward(model: torch.nn.Module, params: Mapping[str, Tensor], inputs):
    """Call ``model`` with ``params`` substituted; dict inputs are passed as keyword arguments."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    return torch.func.functional_call(model, dict(params), args, kwargs, strict=False)


def batch_size(batch) -> int:
    """Number of examples in ``(inputs, targets)``: the leading dimension of the targets."""
    return int(batch[1].shape[0])


def loss_function(model: torch.nn.Module, loss: LossFn, batch) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``L(params)`` on one fixed batch (mean over its examples, as ``loss`` defines it)."""
    inputs, targets = batch

    def L(params: Mapping[str, Tensor]) -> Tensor:
        return loss(forward(model, params, inputs), targets)

    return L


def named_params(model: torch.nn.Module, names: Iterable[str] | None = None) -> ParamDict:
    """Detached copies of the model's trainable parameters (all, or the given names, in that order)."""
    all_params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    missing = [n for n in names if n not in all_params]
    if missing:
        raise KeyError(f"unknown parameter names: {missing}")
    return {n: all_params[n].detach() for n in names}


def _leaves(params: Mapping[str, Tensor]) -> ParamDict:
    return {n: p.detach().requires_grad_(True) for n, p in params.items()}


def _fill(grads, params: ParamDict) -> ParamDict:
    # Parameters the loss never touches (a BERT pooler, say) have an exactly zero derivative.
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Euclidean inner product of two parameter dicts over the keys of ``a``."""
    return sum((a[n] * b[n]).sum() for n in a)


def norm(a: Mapping[str, Tensor]) -> Tensor:
    return torch.sqrt(dot(a, a))


def value_and_grad(L: Callable, params: Mapping[str, Tensor]) -> tuple[Tensor, ParamDict]:
    ps = _leaves(params)
    value = L(ps)
    grads = torch.autograd.grad(value, list(ps.values()), allow_unused=True)
    return value.detach(), _fill(grads, ps)


def hvp(L: Callable, params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> ParamDict:
    """Exact Hessian-vector product by double backward (reverse over reverse)."""
    return value_grad_hvp(L, params, v)[2]


def value_grad_hvp(L: Callable, params: Mapping[str, Tensor], v: Mapping[str, Tensor]):
    """Loss, gradient and H·v from one forward pass (double backward)."""
    ps = _leaves(params)
    value = L(ps)
    grads = _fill(torch.autograd.grad(value, list(ps.values()), create_graph=True, allow_unused=True), ps)
    inner = sum((grads[n] * v[n]).sum() for n in ps if grads[n].requires_grad)
    if not torch.is_tensor(inner) or not inner.requires_grad:  # loss is linear in these parameters
        hv = {n: torch.zeros_like(p) for n, p in ps.items()}
    else:
        hv = _fill(torch.autograd.grad(inner, list(ps.values()), allow_unused=True), ps)
    return value.detach(), {n: g.detach() for n, g in grads.items()}, hv
