"""Forward-only convolution derivatives (`analyses/curvature/conv.py`) against torch and dense float64 Hessians."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from eqlab.analyses.curvature import conv as fc
from eqlab.analyses.curvature.operator import CACHED, HessianOperator
from test_curvature_operator import reference_hessian, rel, tiny_cnn

F64 = torch.float64
torch.set_num_threads(1)


@pytest.mark.parametrize("shape,kernel,padding", [((3, 2, 6, 5), (3, 3), (1, 1)), ((2, 3, 7, 7), (5, 3), (2, 0)),
                                                  ((2, 1, 5, 6), (2, 4), (1, 3)), ((2, 2, 4, 4), (1, 1), (0, 0))])
def test_first_and_second_derivatives_are_torchs(shape, kernel, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, shape[1], *kernel, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    f = lambda x, w, b: fc.conv2d(x, w, b, padding)  # noqa: E731
    with torch.no_grad():
        assert rel(f(x, w, b), nn.functional.conv2d(x, w, b, padding=padding)) <= 1e-14
    assert gradcheck(f, (x, w, b)) and gradgradcheck(f, (x, w, b))


class _Unflipped(fc._Conv2d):
    """Negative control: the input gradient without the kernel flip (right only for symmetric kernels)."""

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, w.shape[-2:]
        return nn.functional.conv2d(gy, w.transpose(0, 1), padding=(kh - 1 - ph, kw - 1 - pw)), None, None


def test_negative_control_a_wrong_backward_fails_gradcheck():
    x = torch.randn(2, 2, 5, 5, dtype=F64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=F64)
    assert not gradcheck(lambda x: _Unflipped.apply(x, w, (1, 1)), (x,), raise_exception=False)


@pytest.mark.parametrize("method", ["double_backward", CACHED])
def test_hessian_with_forward_convs_matches_dense(method):
    model, loss, (X, y) = tiny_cnn()  # BatchNorm in train mode, two padded 3x3 convs
    batches = [(X[:20], y[:20]), (X[20:], y[20:])]
    H = reference_hessian(model, loss, batches)
    op = HessianOperator(model, loss, batches, method=method, conv="forward")
    assert op.conv == "forward" and fc.count_eligible(op.model) == 2
    assert sum(type(m) is fc.ForwardConv2d for m in op.model.modules()) == 2
    assert not any(type(m) is fc.ForwardConv2d for m in model.modules())  # the caller's model is untouched
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-10
    assert rel(op.matmat(V), H @ V) <= 1e-10


def test_auto_is_a_rule_and_ineligible_convs_stay_native():
    model, loss, batch = tiny_cnn()
    op = HessianOperator(model, loss, batch)  # method and conv both auto: float64 on the CPU -> native
    assert op.conv == "native" and "float64" in op.conv_reason and op.hvps_setup == 0
    op32 = HessianOperator(model, loss, batch, dtype=torch.float32)  # float32 on the CPU -> forward convs
    assert op32.conv == "forward" and op32.conv_reason.startswith("auto: float32")
    assert fc.count_eligible(op32.model) == 2 and op32.hvps_setup == 0
    strided = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 3, dilation=2, padding=2),
                            nn.Conv2d(2, 2, 3, padding="same"), nn.Flatten(), nn.LazyLinear(3)).double()
    Xs = torch.randn(4, 1, 9, 9, dtype=F64)
    strided(Xs)
    assert fc.count_eligible(strided) == 0
    op = HessianOperator(strided, nn.CrossEntropyLoss(), (Xs, torch.tensor([0, 1, 2, 0])), conv="auto")
    assert op.conv == "native"
    with pytest.raises(ValueError, match="forward-mode"):
        HessianOperator(model, loss, batch, method="forward_over_reverse", conv="forward")
    with pytest.raises(ValueError, match="conv must be"):
        HessianOperator(model, loss, batch, conv="fast")


def test_keep_freed_memory_applies_once_in_its_own_process():
    """The setting is process-wide, so it is applied in a fresh interpreter; its effect on page faults
    and product times is measured by the benchmark (M8), not asserted here."""
    code = ("import torch; from eqlab.pipeline.allocator import keep_freed_memory as k; a = k(); b = k(); "
            "x = torch.randn(1 << 20); print(a, b, float((x - x).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import platform
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert out == [expected, expected, "0.0"]
