"""The curvature engine as one object: `Hessian`, what ``eqlab.hessian(model, loss, batch)`` returns.

It is a `HessianOperator` (exact products, the operator's model copy, method and conv rules) with the
engine's solvers as methods, every budget defaulting to the one defaults table row of the dtype the
products run in (`defaults.for_dtype`, the row the CLI and the study read), and counters for all the
work the object ever did:

* ``n_hvp``: Hessian-vector products, one per vector over all batches, those spent setting the operator
  up (``hvps_setup``) included;
* ``n_gradients``: first-order passes (a forward and a first backward on one batch): the trial graph of
  ``method="auto"``, every first-order graph the cached method builds, ``gradient``, ``loss`` and
  ``check_deterministic``;
* ``forwards_setup``: plain forwards spent checking the inputs (`eqlab.api` checks the CLI's contract).

The results are the solvers' own: `LanczosResult` (``top_k``/``bottom_k``), `SLQResult` (``density``),
`TraceEstimate` (``trace``); each carries its own ``n_matvec``.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from eqlab.analyses.curvature.defaults import Defaults, as_dtype, for_dtype
from eqlab.analyses.curvature.lanczos import LanczosResult, lanczos
from eqlab.analyses.curvature.operator import CACHED, HessianOperator
from eqlab.analyses.curvature.params import ParamSpace
from eqlab.analyses.curvature.slq import SLQResult, slq
from eqlab.analyses.curvature.trace import TraceEstimate, hutchpp


class Hessian:
    """The Hessian of ``loss`` over ``batches`` at the model's current parameters (module doc).

    ``batches``: one ``(inputs, targets)`` pair or a sequence of them (the example-weighted mean loss,
    `operator` module doc). ``names``: the parameters (a block) to differentiate by, or ``block`` a
    regex on trainable parameter names (as ``eqlab spectrum --block``); default all trainable ones.
    ``dtype``: the products' dtype (a torch dtype or its name; default the model's own). ``method``,
    ``conv``, ``max_cache_bytes``: as `HessianOperator`, whose recorded choices are ``method``,
    ``method_reason``, ``conv``, ``conv_reason`` here.
    """

    def __init__(self, model: torch.nn.Module, loss, batches, *, names=None, block: str | None = None,
                 dtype=None, method: str = "auto", conv: str = "auto", max_cache_bytes: int | None = None):
        if names is not None and block is not None:
            raise ValueError("give names or block, not both")
        if block is not None:
            names = ParamSpace.matching(model, block)
        work = None if dtype is None else as_dtype(dtype)
        if dtype is not None and (work is None or not work.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
        self.operator = HessianOperator(model, loss, batches, names=names, method=method, dtype=work,
                                        conv=conv, max_cache_bytes=max_cache_bytes)
        self.defaults: Defaults = for_dtype(self.operator.dtype)
        self.forwards_setup = 0
        self._gradient_passes = 0
        # The operator counts its setup pass (the trial graph); graphs it builds later for its cached
        # method are seen here, each object once (a WeakSet: a freed graph's id may be reused).
        self._graphs_seen: weakref.WeakSet = weakref.WeakSet()
        self._graph_builds = 0
        self._note_graphs(setup=True)

    # -- what it is -----------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.operator.dim

    @property
    def shape(self) -> tuple[int, int]:
        return self.operator.shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the products are computed in (the defaults row is this dtype's)."""
        return self.operator.dtype

    @property
    def names(self) -> list[str]:
        return list(self.operator.space.names)

    @property
    def method(self) -> str:
        return self.operator.method

    @property
    def method_reason(self) -> str:
        return self.operator.method_reason

    @property
    def conv(self) -> str:
        return self.operator.conv

    @property
    def conv_reason(self) -> str:
        return self.operator.conv_reason

    # -- counters -------------------------------------------------------------------------------------
    def _note_graphs(self, setup: bool = False) -> None:
        for g in self.operator._graphs:  # noqa: SLF001  (read only: which graph objects exist now)
            if g is not None and g not in self._graphs_seen:
                self._graphs_seen.add(g)
                if not setup:  # the trial graph kept as batch 0's cache is the operator's gradients_setup
                    self._graph_builds += 1

    @property
    def n_hvp(self) -> int:
        """Every Hessian-vector product this object did: setup, solvers, ``matvec``/``matmat``, checks."""
        return self.operator.n_hvp + self.operator.hvps_setup

    @property
    def n_gradients(self) -> int:
        """Every first-order pass (forward + first backward on one batch) this object did."""
        return self.operator.gradients_setup + self._graph_builds + self._gradient_passes

    @property
    def counts(self) -> dict[str, int]:
        """The counters with their parts."""
        op = self.operator
        return {"n_hvp": self.n_hvp, "hvps_setup": op.hvps_setup, "hvps": op.n_hvp,
                "n_gradients": self.n_gradients, "gradients_setup": op.gradients_setup,
                "graph_builds": self._graph_builds, "gradients": self._gradient_passes,
                "forwards_setup": self.forwards_setup}

    # -- products ---------------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """H v (in ``v``'s dtype and device)."""
        out = self.operator.matvec(v)
        self._note_graphs()
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape (dim, k): k products."""
        out = self.operator.matmat(V)
        self._note_graphs()
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def gradient(self) -> Tensor:
        """∇L (float64), one first-order pass per batch."""
        g = self.operator.gradient()
        self._gradient_passes += len(self.operator.batches)
        return g

    def loss(self) -> float:
        """L, the example-weighted mean loss (a first-order pass per batch: it is computed with ∇L)."""
        value = self.operator.loss()
        self._gradient_passes += len(self.operator.batches)
        return value

    def check_deterministic(self, rtol: float | None = None, seed: int = 0) -> float:
        """`HessianOperator.check_deterministic`: two products and two gradients must agree (raises if not)."""
        op = self.operator
        # with the cached method the first product builds the missing graphs, which are then dropped
        # (the second product runs on fresh ones) before they can be seen: count them here
        missing = sum(g is None for g in op._graphs) if op.method == CACHED else 0  # noqa: SLF001
        try:
            return op.check_deterministic(rtol=rtol, seed=seed)
        finally:
            self._gradient_passes += 2 * len(op.batches)
            self._graph_builds += missing
            self._note_graphs()

    # -- solvers ----------------------------------------------------------------------------------------
    def _lanczos(self, which: str, k: int, tol, max_iter, rtol, seed: int, verify: bool) -> LanczosResult:
        row = self.defaults
        try:
            # float64 basis (as the CLI and the study), products in self.dtype, whose row sets tol
            return lanczos(self.operator.matvec, self.dim, k=k, which=which,
                           tol=row.tol if tol is None else tol,
                           max_iter=row.max_iter if max_iter is None else max_iter, seed=seed,
                           dtype=torch.float64, precision=self.dtype, rtol=rtol, verify=verify)
        finally:
            self._note_graphs()

    def top_k(self, k: int = 5, *, tol: float | None = None, max_iter: int | None = None,
              rtol: float | None = None, seed: int = 0, verify: bool = True) -> LanczosResult:
        """The k largest eigenvalues, largest first, with true residuals, error bounds and ``converged``
        (`lanczos`; ``tol``/``max_iter`` default to this dtype's row, ``rtol`` is the opt-in rule)."""
        return self._lanczos("LA", k, tol, max_iter, rtol, seed, verify)

    def bottom_k(self, k: int = 5, *, tol: float | None = None, max_iter: int | None = None,
                 rtol: float | None = None, seed: int = 0, verify: bool = True) -> LanczosResult:
        """The k smallest (most negative) eigenvalues, smallest first (see `top_k`)."""
        return self._lanczos("SA", k, tol, max_iter, rtol, seed, verify)

    def density(self, steps: int | None = None, probes: int | None = None, seed: int = 0) -> SLQResult:
        """The spectral density by stochastic Lanczos quadrature (`slq`): ``probes`` Rademacher probes of
        ``steps`` Lanczos steps (this dtype's row by default); probes run as `slq.probe_path` rules (in this
        process: one after another), recorded in the result's ``path``/``path_reason``."""
        row = self.defaults
        try:
            return slq(self.operator.matvec, self.dim, steps=row.slq_steps if steps is None else steps,
                       probes=row.slq_probes if probes is None else probes, seed=seed,
                       matmat=self.operator.matmat)
        finally:
            self._note_graphs()

    def trace(self, n_matvec: int | None = None, seed: int = 0) -> TraceEstimate:
        """tr H by Hutch++ (`trace.hutchpp`) with ``n_matvec`` products (this dtype's row by default); its
        columns go as `slq.probe_path` rules (in this process: one by one), recorded in ``path``."""
        try:
            return hutchpp(self.operator.matvec, self.dim,
                           n_matvec=self.defaults.trace_matvecs if n_matvec is None else n_matvec,
                           seed=seed, matmat=self.operator.matmat)
        finally:
            self._note_graphs()

    def __repr__(self) -> str:
        return (f"Hessian(dim={self.dim}, dtype={str(self.dtype).replace('torch.', '')}, method={self.method!r}, "
                f"conv={self.conv!r}, n_hvp={self.n_hvp}, n_gradients={self.n_gradients})")
