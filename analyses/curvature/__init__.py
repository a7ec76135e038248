"""Curvature engine: exact Hessian-vector products and spectral methods over named parameters."""
