"""Transformations of a model's named parameters, as data.

A transformation is recorded in result tables, so each one is a small JSON-serialisable object naming the
parameter slices it acts on; the numbers (the generator ξ(θ), a finite group element) are computed from that
description on demand. Two kinds:

* continuous families, given by ``n_generators`` independent generators ξ_k. A coefficient vector c picks the
  generator ξ_c = Σ_k c_k ξ_k; every such combination is itself a generator, so one random c checks the whole
  family at the cost of one check. Optional equivariance data: ``output_scale[k]`` = b_k (model level,
  f(T_s θ) = e^{s b} f, i.e. B = b·I) and ``loss_rate[k]`` = a_k (loss level, L(T_s θ) = e^{s a} L).
* continuous families with affine finite elements (analyses.transforms.affine): bias transfers β → β + δ,
  b → b − Wδ, and scalings of an offset parameter w → a(w + o) − o;
* discrete transformations T (permutations, sign flips, any invertible linear map, or a finite element
  e^{sA} of a continuous family), applied exactly; with the linear part T_lin for the (D1)/(D2) identities.

A *slice* is (param, dim, index): the positions ``index`` along axis ``dim`` of the named parameter, all of
the other axes (dim=None: the whole tensor). Conventions follow the tensors as stored: nn.Linear weights are
(out, in), transformers' Conv1D weights are (in, out).
"""
from eqlab.analyses.transforms.affine import BiasTransferFamily, OffsetScaleFamily
from eqlab.analyses.transforms.base import ParamDict, Transformation
from eqlab.analyses.transforms.continuous import Continuous, GLFamily, ScaleFamily, SubGLFamily, TranslationFamily
from eqlab.analyses.transforms.discrete import Discrete, GroupElement, LinearMap, Permutation, SignFlip

__all__ = ["ParamDict", "Transformation", "Continuous", "GLFamily", "ScaleFamily", "SubGLFamily", "TranslationFamily",
           "BiasTransferFamily", "OffsetScaleFamily",
           "Discrete", "GroupElement", "LinearMap", "Permutation", "SignFlip"]
