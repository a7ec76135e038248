"""A diagonal scaling whose terms select a slice along several axes at once: [param, axes, indices, coef].

`ScaleFamily` terms select positions along one axis (a row of a linear map). Experts stored as one 3-d
tensor (transformers 5's fused MoE: gate_up_proj (E, 2I, H), down_proj (E, H, I)) need unit r *of expert e*,
positions along two axes; ``[P, [0, 1], [[e], [r]], 1.0]`` is P[e, r, :]. Everything else (the finite
element e^{sD}, its tangent and cotangent maps) is `DiagonalScale`'s, shared with ScaleFamily, with D the
sum of the terms' products of axis indicators. Registered for JSON like the toolbox's own transformations.
"""
from __future__ import annotations

import torch

from eqlab.analyses.transforms.base import _register
from eqlab.analyses.transforms.continuous import DiagonalScale


@_register
class SliceScaleFamily(DiagonalScale):
    """Generator k scales the slice (param, axes, indices) by ``coef`` for each of its terms: ξ_k = D_k ⊙ θ.
    Not a ScaleFamily: code that reads ScaleFamily terms as [param, dim, index, coef] must not see these."""

    def __init__(self, name, family, generators, output_scale=None, loss_rate=None, expected=True):
        super().__init__(name, family, [[[p, [int(a) for a in axes], [[int(j) for j in ix] for ix in idx], float(k)]
                                         for p, axes, idx, k in g] for g in generators],
                         output_scale, loss_rate, expected)

    def field(self, theta, c):
        D = {n: torch.zeros_like(theta[n]) for n in self.params}
        for ck, g in zip(c.tolist(), self.generators):
            for p, axes, idx, k in g:
                t = D[p]
                mask = torch.ones((1,) * t.dim(), dtype=torch.bool, device=t.device)
                for a, ix in zip(axes, idx):
                    vec = torch.zeros(t.shape[a], dtype=torch.bool, device=t.device)
                    vec[torch.as_tensor(ix, device=t.device)] = True
                    shape = [1] * t.dim()
                    shape[a] = -1
                    mask = mask & vec.reshape(shape)
                t += (ck * k) * mask.to(t.dtype)
        return D
