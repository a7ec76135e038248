"""Plain-PyTorch blocks outside the catalog, written from raw torch ops so that discovery has to recognise
them from their op graphs: a hand-written ScaleNorm and LayerNorm, a bilinear GLU, and a model with no
continuous symmetry of the known kinds."""
import torch
from torch import nn


class ScaleNorm(nn.Module):
    """g·x/‖x‖ with one scalar gain g (Nguyen & Salazar 2019): scale-invariant, not mean-free."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return self.g * (x / x.norm(dim=-1, keepdim=True))


class HandLayerNorm(nn.Module):
    """(x − mean)/sqrt(var + eps), no affine, from torch ops."""

    def __init__(self, eps=0.0):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)


class BilinearGLU(nn.Module):
    """down((x W)ᵀ ⊙ (x V)): both factors linear (no activation)."""

    def __init__(self, d, h):
        super().__init__()
        self.w, self.v, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(self.w(x) * self.v(x))


class NormGLUNet(nn.Module):
    """lin0 → ScaleNorm → lin1 → hand LayerNorm → bilinear GLU → head (softmax classifier)."""

    def __init__(self, d_in=6, d=8, h=6, classes=4, eps=0.0):
        super().__init__()
        self.lin0, self.sn, self.lin1 = nn.Linear(d_in, d), ScaleNorm(), nn.Linear(d, d)
        self.ln, self.glu, self.head = HandLayerNorm(eps), BilinearGLU(d, h), nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.glu(self.ln(self.lin1(self.sn(self.lin0(x))))))


class TiedTanhSoftplus(nn.Module):
    """y = tanh(W_out·softplus(L·tanh(L·x))) with one square L used twice: no rescale (tanh, softplus are
    not homogeneous), no sign flip (softplus is not odd, and L is tied), no softmax, no norm, no homogeneity
    (tanh at the output)."""

    def __init__(self, d=6, out=3):
        super().__init__()
        self.L, self.out = nn.Linear(d, d), nn.Linear(d, out)

    def forward(self, x):
        return torch.tanh(self.out(nn.functional.softplus(self.L(torch.tanh(self.L(x))))))
