"""A 2-D convolution whose derivatives of every order are forward convolutions.

Why. Torch differentiates ``conv2d`` through ``convolution_backward``, whose input gradient is a
*transposed* convolution, and the double backward (every HVP by reverse-over-reverse) adds more of
them. On the CPU, for the small channel counts of the CNNs we study, the transposed kernels take a
slow path: on the digits CNN (channels 2 and 4, 512 8×8 images, float32, 1 thread) a transposed
conv costs 1.24 ms against 0.24 ms for the forward conv of the same size, and they make up most of
an HVP. For stride 1 and dilation 1 both gradients *are* forward convolutions:

    ∂x = conv2d(∂y, flip(W)ᵀ, padding = k − 1 − p)          (full correlation with the flipped kernel)
    ∂W = conv2d(xᵀ, ∂yᵀ, padding = p)ᵀ                       (batch as channels; ᵀ swaps dims 0 and 1)

`_Conv2d.backward` computes them with `_Conv2d` itself and is not ``once_differentiable``, so autograd
records it under ``create_graph`` and every higher derivative is again a forward convolution. It is the
same function, not an approximation: products agree with the native path to round-off (tests, dense
float64 truth). Whether it is faster is a property of the kernels on a device, so `HessianOperator`
measures both and keeps the faster (``conv="auto"``); CUDA's cuDNN has fast transposed kernels and
the native path will usually win there.

Scope: ``nn.Conv2d`` exactly (not subclasses), stride 1, dilation 1, groups 1, zero padding given as
numbers with p ≤ k − 1. Other convolutions keep the native path. No forward-mode AD (no ``jvp``), so
the operator never combines it with ``forward_over_reverse``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        return F.conv2d(x, w, padding=padding)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, w.shape[-2:]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _Conv2d.apply(gy, w.flip(2, 3).transpose(0, 1), (kh - 1 - ph, kw - 1 - pw))
        if ctx.needs_input_grad[1]:
            gw = _Conv2d.apply(x.transpose(0, 1), gy.transpose(0, 1), (ph, pw)).transpose(0, 1)
        return gx, gw, None


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    y = _Conv2d.apply(x, w, tuple(padding))
    return y if bias is None else y + bias[:, None, None]


def eligible(m: nn.Module) -> bool:
    """Can ``m`` be switched to `ForwardConv2d` (module doc: scope)?"""
    if type(m) is not nn.Conv2d:  # noqa: E721  (subclasses may override forward)
        return False
    pad = m.padding
    return (m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(pad, str) and all(0 <= p <= k - 1 for p, k in zip(pad, m.kernel_size)))


class ForwardConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and names) computed by `conv2d` above."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return conv2d(input, weight, bias, self.padding)


def use_forward_convs(model: nn.Module, on: bool) -> int:
    """Switch every eligible conv of ``model`` in place (``on``) or back; returns how many."""
    n = 0
    for m in model.modules():
        if on and eligible(m):
            m.__class__ = ForwardConv2d
            n += 1
        elif not on and type(m) is ForwardConv2d:
            m.__class__ = nn.Conv2d
            n += 1
    return n


def count_eligible(model: nn.Module) -> int:
    return sum(eligible(m) or type(m) is ForwardConv2d for m in model.modules())
