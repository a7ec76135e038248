"""One adapter per library, all with the same small interface, so every metric runs the same code
against every contender.

Interface (flat vectors are 1-D tensors in the problem's dtype):
  ``matvec(v)``                 the library's own Hessian-vector product (counted in ``n_hvp``)
  ``topk(k, **setting)``        -> (eigenvalues descending, HVPs used), the library's own eigensolver
  ``trace(n, method, seed)``    -> estimate, the library's own estimator at a budget of n matvecs
  ``slq(steps, probes, seed)``  -> (nodes, weights) pooled quadrature measure, or raises NotImplementedError
  ``block(names)``              -> an adapter restricted to a parameter block, or raises NotImplementedError

``setup_s`` is the wall time of the library's own construction (not the harness's model copy), so a
whole call is ``setup_s`` + the solve; ``gradients_setup`` counts the first-order passes it made.

Each adapter works on its own deep copy of the model: PyHessian calls ``model.eval()`` and fills
``.grad`` with a create_graph backward, and eigenthings' finite-difference path writes to parameters.
HVPs are counted by wrapping the library's matvec entry point, never by trusting its own counter.
"""
from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch

from bench.models import Problem


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _split(v, params):
    out, i = [], 0
    for p in params:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


class Adapter:
    name = "?"

    def __init__(self, problem: Problem, names=None):
        self.problem = problem
        self.model = copy.deepcopy(problem.model)
        self.names = names or [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.dtype = next(self.model.parameters()).dtype
        self.n_hvp = 0
        self.setup_s = 0.0
        self.gradients_setup = 0

    @property
    def dim(self) -> int:
        ps = dict(self.model.named_parameters())
        return sum(ps[n].numel() for n in self.names)

    def slq(self, steps, probes, seed):
        raise NotImplementedError(f"{self.name} has no SLQ")

    def block(self, names):
        return type(self)(self.problem, names)


# ---------------------------------------------------------------------------------------------------
class Eqlab(Adapter):
    name = "eqlab"

    def __init__(self, problem, names=None, method="auto", conv="auto", basis_dtype=torch.float64):
        super().__init__(problem, names)
        from eqlab.analyses.curvature.operator import HessianOperator
        t0 = time.perf_counter()
        self.op = HessianOperator(self.model, problem.loss, problem.batches, names=names, method=method, conv=conv)
        self.setup_s = time.perf_counter() - t0
        self.method, self.conv = self.op.method, self.op.conv
        self.n_hvp = self.op.hvps_setup  # products spent choosing the method count like any other
        self.gradients_setup = self.op.gradients_setup
        self.basis_dtype = basis_dtype  # float32 on the 22M-parameter models: 2·m·n·4 B of basis, not 8

    def matvec(self, v):
        self.n_hvp += 1
        return self.op.matvec(v)

    def topk(self, k=5, tol=None, max_iter=None, seed=0, rtol=None, min_iter=None, verify=True):
        """tol None: the dtype's default (√eps of the products' dtype), verification block on."""
        from eqlab.analyses.curvature.lanczos import lanczos
        before = self.n_hvp
        res = lanczos(self.matvec, self.dim, k=k, which="LA", tol=tol, max_iter=max_iter, seed=seed,
                      rtol=rtol, min_iter=min_iter, verify=verify, dtype=self.basis_dtype,
                      precision=self.op.dtype, warn=False)
        return res.eigenvalues.double().numpy(), self.n_hvp - before, res

    def trace(self, n, method="hutch++", seed=0):
        from eqlab.analyses.curvature.trace import hutchinson, hutchpp
        fn = {"hutchinson": hutchinson, "hutch++": hutchpp}[method]
        # matmat batches the probe columns (one forward + first backward per chunk): eqlab's fast path
        return fn(self.matvec, self.dim, n_matvec=n, seed=seed, matmat=self.op.matmat).estimate

    def slq(self, steps, probes, seed=0):
        from eqlab.analyses.curvature.slq import slq
        res = slq(self.matvec, self.dim, steps=steps, probes=probes, seed=seed)
        return res.pooled(), res

    def block(self, names):
        return Eqlab(self.problem, names, method=self.method, conv=self.conv)


# ---------------------------------------------------------------------------------------------------
class Curvlinops(Adapter):
    name = "curvlinops"

    def __init__(self, problem, names=None):
        super().__init__(problem, names)
        from curvlinops import HessianLinearOperator
        ps = dict(self.model.named_parameters())
        self.params = [ps[n] for n in self.names]
        n = sum(int(y.shape[0]) for _, y in problem.batches)
        # check_deterministic=False: it costs extra matvecs at construction (D.3: time it separately)
        t0 = time.perf_counter()
        self.H = HessianLinearOperator(self.model, problem.loss, self.params, problem.batches,
                                       check_deterministic=False, num_data=n)
        self.setup_s = time.perf_counter() - t0

    def matvec(self, v):
        self.n_hvp += 1
        return self.H @ v.to(self.dtype)

    def scipy(self):
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            return self.matvec(torch.from_numpy(np.asarray(x).reshape(-1)).to(self.dtype)).double().numpy()
        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np.float64)

    def topk(self, k=5, tol=0.0, ncv=None, seed=0):
        from scipy.sparse.linalg import eigsh
        rng = np.random.default_rng(seed)
        before = self.n_hvp
        vals = eigsh(self.scipy(), k=k, which="LA", tol=tol, ncv=ncv, v0=rng.standard_normal(self.dim),
                     return_eigenvectors=False)
        return np.sort(vals)[::-1], self.n_hvp - before, None

    def trace(self, n, method="hutch++", seed=0):
        from curvlinops import hutchinson_trace, hutchpp_trace, xtrace
        fn = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace}[method]
        if method == "hutch++":
            n = 3 * (n // 3)  # curvlinops requires a multiple of 3 (so 10 -> 9, 100 -> 99)
        torch.manual_seed(seed)  # curvlinops draws its probes from the global generator
        return float(fn(_CountingTorchOp(self), n))

    def slq(self, steps, probes, seed=0):
        # curvlinops' SLQ core (Papyan 2020, algorithm 2: no reorthogonalisation), the routine that
        # LanczosApproximateSpectrumCached caches; we read its nodes/weights rather than its smoothed grid
        # so the W1 comparison is measure against measure, like eqlab's.
        from curvlinops.papyan2020traces.spectrum import fast_lanczos
        torch.manual_seed(seed)
        nodes, weights = [], []
        op = _CountingTorchOp(self)
        for _ in range(probes):
            evals, evecs = fast_lanczos(op, steps)
            nodes.append(evals.double().numpy())
            weights.append((evecs[0] ** 2).double().numpy() / probes)
        nodes, weights = np.concatenate(nodes), np.concatenate(weights)
        order = np.argsort(nodes)
        return (nodes[order], weights[order]), None


class _CountingTorchOp:
    """Just enough of curvlinops' PyTorchLinearOperator for its trace and Lanczos routines, counting HVPs."""

    def __init__(self, ad: Curvlinops):
        self.ad, self.H = ad, ad.H
        self.shape, self.dtype, self.device = ad.H.shape, ad.H.dtype, ad.H.device

    def __matmul__(self, X):
        self.ad.n_hvp += 1 if X.dim() == 1 else X.shape[1]
        return self.H @ X

    def __getattr__(self, item):
        return getattr(self.H, item)


# ---------------------------------------------------------------------------------------------------
class PyHessian(Adapter):
    """PyHessian 0.1. Single batch: its fast mode (the create_graph backward is done once and reused).
    Several batches: its dataloader mode (size-weighted). Its random vectors are drawn in the default
    dtype, so float64 problems run under ``torch.set_default_dtype(float64)``."""

    name = "pyhessian"

    def __init__(self, problem, names=None):
        if names is not None:
            raise NotImplementedError("PyHessian has no per-block Hessian (issue #10)")
        super().__init__(problem, names)
        import importlib
        # the package re-exports the class under the module's name, so fetch the module itself
        ph = importlib.import_module("pyhessian.hessian")
        self._ph = ph
        crit = problem.loss
        t0 = time.perf_counter()
        with self._dtype_ctx():
            if len(problem.batches) == 1:  # builds the create_graph gradient once (its fast mode)
                self.h = ph.hessian(self.model, crit, data=problem.batches[0], cuda=False)
                self.gradients_setup = 1
            else:
                self.h = ph.hessian(self.model, crit, dataloader=problem.batches, cuda=False)
        self.setup_s = time.perf_counter() - t0
        self._install_counter()

    @contextlib.contextmanager
    def _dtype_ctx(self):
        old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)

    def _install_counter(self):
        ph, ad = self._ph, self
        if not hasattr(ph, "_bench_orig_hvp"):
            ph._bench_orig_hvp = ph.hessian_vector_product
            ph._bench_orig_dl = ph.hessian.dataloader_hv_product

        def hvp(gradsH, params, v):
            ph._bench_counter.n_hvp += 1
            return ph._bench_orig_hvp(gradsH, params, v)

        def dl(self_, v):
            ph._bench_counter.n_hvp += 1
            return ph._bench_orig_dl(self_, v)
        ph.hessian_vector_product = hvp
        ph.hessian.dataloader_hv_product = dl
        ph._bench_counter = ad

    def matvec(self, v):
        self._ph._bench_counter = self
        vs = _split(v.to(self.dtype), self.h.params)
        if self.h.full_dataset:
            _, hv = self.h.dataloader_hv_product(vs)
        else:
            hv = self._ph.hessian_vector_product(self.h.gradsH, self.h.params, vs)
        return _flat(hv)

    def topk(self, k=5, tol=1e-3, maxIter=100, seed=0):
        self._ph._bench_counter = self
        torch.manual_seed(seed)
        before = self.n_hvp
        with self._dtype_ctx():
            vals, _ = self.h.eigenvalues(maxIter=maxIter, tol=tol, top_n=k)
        return np.sort(np.array(vals))[::-1], self.n_hvp - before, None

    def trace(self, n, method="hutchinson", seed=0):
        if method != "hutchinson":
            raise NotImplementedError("PyHessian has Hutchinson only")
        self._ph._bench_counter = self
        torch.manual_seed(seed)
        with self._dtype_ctx():
            samples = self.h.trace(maxIter=n, tol=0.0)  # tol=0: spend the whole budget (no early stop)
        return float(np.mean(samples))

    def slq(self, steps, probes, seed=0):
        self._ph._bench_counter = self
        torch.manual_seed(seed)
        with self._dtype_ctx():
            eig, w = self.h.density(iter=steps, n_v=probes)  # raises on torch >= 1.9 (torch.eig removed)
        nodes, weights = np.concatenate(eig), np.concatenate(w) / probes
        order = np.argsort(nodes)
        return (nodes[order], weights[order]), None


# ---------------------------------------------------------------------------------------------------
class Eigenthings(Adapter):
    """hessian-eigenthings 1.0.0a5: averages batch means with EQUAL weight per batch (A.7), so on
    unequal batches it computes a different operator; M2 shows by how much."""

    name = "eigenthings"

    def __init__(self, problem, names=None):
        super().__init__(problem, names)
        import hessian_eigenthings as he
        self.he = he
        keep = set(self.names)
        t0 = time.perf_counter()
        self.op = he.HessianOperator(self.model, problem.batches, he.supervised_loss(problem.loss),
                                     param_filter=(lambda n, p: n in keep) if names else None)
        self.setup_s = time.perf_counter() - t0
        orig = self.op.matvec

        def counted(v):
            self.n_hvp += 1
            return orig(v)
        self.op.matvec = counted  # the algorithms call operator.matvec: count there

    def matvec(self, v):
        return self.op.matvec(v.to(self.dtype))

    def topk(self, k=5, max_iter=30, reorthogonalize=None, tol=1e-4, seed=0):
        before = self.n_hvp
        res = self.he.lanczos(self.op, k=k, max_iter=max_iter, which="LA", tol=tol,
                              reorthogonalize=reorthogonalize, seed=seed)
        return np.sort(res.eigenvalues.double().numpy())[::-1], self.n_hvp - before, res

    def trace(self, n, method="hutch++", seed=0):
        return float(self.he.trace(self.op, num_matvecs=n, method=method, seed=seed).estimate)

    def slq(self, steps, probes, seed=0):
        res = self.he.spectral_density(self.op, num_runs=probes, lanczos_steps=steps, seed=seed)
        nodes = res.raw_eigenvalues.double().numpy().reshape(-1)
        weights = res.raw_weights.double().numpy().reshape(-1) / probes
        keep = ~np.isnan(nodes)
        order = np.argsort(nodes[keep])
        return (nodes[keep][order], weights[keep][order]), res


LIBRARIES = {"eqlab": Eqlab, "curvlinops": Curvlinops, "pyhessian": PyHessian, "eigenthings": Eigenthings}
