"""Tiny float64-friendly models for the prediction checks (analyses/predictions): a Linear→norm MLP whose
first layer is scale-invariant, a single-head attention readout (Q/K GL(d_h)), a two-factor linear net."""
import torch
from torch import nn


class _RMS(nn.Module):
    """RMSNorm without affine (no mean subtraction: the LN translation control)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class NormMLP(nn.Module):
    """fc1 → norm (no affine) → act → fc2. With eps = 0, (fc1.weight, fc1.bias) is a scale-invariant block
    (rows 2a/3a); LN also makes fc1 translation-invariant (row 3b). norm: "ln", "bn" (train mode), "rms"."""

    def __init__(self, d_in=4, hidden=6, out=3, norm="ln", eps=0.0, activation="relu"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = {"ln": lambda: nn.LayerNorm(hidden, eps=eps, elementwise_affine=False),
                     # torch rejects eps = 0 for BN in train mode; 1e-300 is 0 next to any float64 variance
                     "bn": lambda: nn.BatchNorm1d(hidden, eps=max(eps, 1e-300), affine=False),
                     "rms": lambda: _RMS(eps)}[norm]()
        self.act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class TinyAttention(nn.Module):
    """One head over a short sequence, mean-pooled, linear readout: scores (X W_Qᵀ)(X W_Kᵀ)ᵀ/√d_h depend on
    W_Q, W_K only through W_QᵀW_K, so (W_Q, W_K) → (G W_Q, G^{-T} W_K) is a symmetry (rows 6a-6d)."""

    def __init__(self, d=3, d_h=2, out=2):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(d_h, d) / d ** 0.5)
        self.wk = nn.Parameter(torch.randn(d_h, d) / d ** 0.5)
        self.wv = nn.Parameter(torch.randn(d_h, d) / d ** 0.5)
        self.wo = nn.Parameter(torch.randn(out, d_h) / d_h ** 0.5)
        self.d_h = d_h

    def forward(self, x):                       # x: (n, T, d)
        q, k, v = x @ self.wq.T, x @ self.wk.T, x @ self.wv.T
        a = torch.softmax(q @ k.transpose(1, 2) / self.d_h ** 0.5, dim=-1)
        return (a @ v).mean(1) @ self.wo.T


class Factorised(nn.Module):
    """y = U σ(V x) without biases; σ = identity gives the GL(h) symmetry V → GV, U → UG^{-1} (row 8)."""

    def __init__(self, d=4, h=3, out=2, activation=None):
        super().__init__()
        self.V = nn.Linear(d, h, bias=False)
        self.U = nn.Linear(h, out, bias=False)
        self.act = nn.Identity() if activation is None else {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]()

    def forward(self, x):
        return self.U(self.act(self.V(x)))
