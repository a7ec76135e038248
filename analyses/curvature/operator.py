"""The Hessian of a model's example-weighted mean loss over fixed batches, as a linear operator.

Definition. For batches b = 1..B with n_b examples and mean losses L_b, the operator is the Hessian
of  L = Σ_b n_b L_b / Σ_b n_b  with respect to the parameters of a `ParamSpace` (all trainable ones,
or a block), at the parameter values the model has when the operator is built (a snapshot).

Sharding contract. `sum_matvec` and `sum_gradient` return *unnormalised* float64 sums together with
the example count, so a driver can add the results of several shards in float64 and divide once.

Model preparation (on a private deep copy, so the caller's model is never touched):

* The function analysed is the one the model computes *in its current mode*.
* BatchNorm in train mode normalises with the statistics of the batch at hand (that is the function
  being differentiated). Its running-stat update is a side effect that would (a) write a dual tensor
  into a plain buffer under forward-mode AD and (b) change nothing we differentiate, so the copy drops
  the running buffers (``track_running_stats=False``, buffers ``None``): batch statistics, no update.
  Consequence: with BatchNorm, a list of batches is *not* the same as their concatenation (each batch
  is normalised with its own statistics). BatchNorm in eval mode is a fixed affine map and is kept.
* Active dropout (p > 0 in train mode) makes the loss random, so the Hessian is undefined: rejected.
  Other randomness is caught by `check_deterministic`.
* Because the operator is such a snapshot (private copy, fixed batches), the first-order graph of
  each batch may be built once and reused (``method="double_backward_cached"``, `cached.py`): each
  product is then one second backward. The graphs are rebuilt if a parameter or buffer of the copy
  is changed in place, and ``auto`` uses them only within a memory guard (COST.md).
* Parameters are frozen on the copy (``requires_grad=False``) so that parameters outside the block are
  constants and build no graph; the block's values are passed in explicitly.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from eqlab.analyses.curvature.cached import CachedGraph, fingerprint, watched_tensors
from eqlab.analyses.curvature.conv import count_eligible, use_forward_convs
from eqlab.analyses.curvature.functional import batch_size, loss_function, value_and_grad
from eqlab.analyses.curvature.hvp import HVP, HVPS
from eqlab.analyses.curvature.params import ParamSpace

CACHED = "double_backward_cached"
COMPILED = "compiled"  # opt-in only: forward-over-reverse under torch.compile (compiled.py)
METHODS = tuple(HVP) + (CACHED, COMPILED)
FORWARD_MODE = ("forward_over_reverse", COMPILED)  # methods that need forward-mode AD
CONVS = ("auto", "native", "forward")


def default_cache_bytes() -> int:
    """Memory ``auto`` may spend on cached graphs: a quarter of what the OS reports available, ≤ 4 GiB.

    A quarter, because the Krylov basis (2·m·n·s, COST.md) and the products need the rest."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        avail = 4 << 30
    return int(min(avail // 4, 4 << 30))


def active_dropout(model: nn.Module) -> list[str]:
    """Names of modules that would drop activations at random in the model's current mode."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(f"{name or '<root>'} ({type(m).__name__}, p={m.p})")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            found.append(f"{name or '<root>'} (MultiheadAttention, dropout={m.dropout})")
    return found


def analysis_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A private copy of ``model`` prepared for exact, deterministic differentiation (see module doc)."""
    dropout = active_dropout(model)
    if dropout:
        raise ValueError("the model has active dropout, so its loss is random and has no Hessian: "
                         f"{dropout}; call model.eval() or set p=0")
    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _to(x, dtype, device):
    """Move a batch (tensors, dicts, tuples) to ``device``; floating tensors also to ``dtype``."""
    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    if isinstance(x, Mapping):
        return {k: _to(v, dtype, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, dtype, device) for v in x)
    return x


def _as_batch_list(batches) -> list:
    """One ``(inputs, targets)`` pair, or a sequence of them."""
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and torch.is_tensor(batches[1]):
        return [tuple(batches)]
    batches = list(batches)
    if not batches:
        raise ValueError("no batches given")
    return [tuple(b) for b in batches]


class HessianOperator:
    """Exact Hessian-vector products of the example-weighted mean loss (see module doc).

    ``method``: ``"double_backward"``, ``"forward_over_reverse"``, ``"double_backward_cached"`` (the
    first-order graph of every batch is built once and kept; each product is one second backward, see
    `cached.py`), ``"compiled"`` (forward-over-reverse under ``torch.compile``: fastest per product on
    small models, but tens of seconds to compile per batch; opt-in, see `compiled.py`) or ``"auto"``
    (a reproducible rule, `_choose_method`: the cached graph if its measured size times the number of
    batches fits ``max_cache_bytes``, else double backward; no timing). ``self.method`` is what runs and
    ``self.method_reason`` why (record both with results).
    ``dtype``: work in this dtype on a converted copy (default: the model's own dtype).
    ``max_cache_bytes``: memory guard for ``auto`` (default `default_cache_bytes`); an explicit
    ``method="double_backward_cached"`` is obeyed regardless, its estimate is in ``self.cache_bytes``.
    ``conv``: how eligible ``nn.Conv2d`` layers are differentiated: ``"native"`` (torch's
    ``convolution_backward``), ``"forward"`` (every derivative a forward convolution, `conv.py`), or
    ``"auto"`` (a rule from dtype and device, `_choose_conv`; ``self.conv`` and ``self.conv_reason``
    say what was kept and why). Native always with the forward-mode methods (``forward_over_reverse``,
    ``compiled``).
    ``n_hvp`` counts operator applications (one per vector over all batches). Work done to set the
    operator up is counted apart: ``hvps_setup`` products (0: ``auto`` no longer times products) and
    ``gradients_setup`` first-order passes (1 when ``auto`` builds its trial graph).
    """

    def __init__(self, model: nn.Module, loss, batches, names: Sequence[str] | ParamSpace | None = None,
                 method: str = "auto", dtype: torch.dtype | None = None, *, max_cache_bytes: int | None = None,
                 conv: str = "auto"):
        if method not in METHODS + ("auto",):
            raise ValueError(f"method must be one of {METHODS + ('auto',)}, got {method!r}")
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        if conv == "forward" and method in FORWARD_MODE:
            raise ValueError(f"conv='forward' has no forward-mode AD; use conv='native' with {method}")
        self.space = names if isinstance(names, ParamSpace) else ParamSpace(model, names)
        self.model = analysis_copy(model, dtype)
        first = next(iter(self.model.parameters()))
        self.dtype, self.device = first.dtype, first.device
        available = dict(self.model.named_parameters())
        self.params = {n: available[n].detach() for n in self.space.names}
        self.loss_fn = loss
        self.batches = [_to(b, self.dtype, self.device) for b in _as_batch_list(batches)]
        self.sizes = [batch_size(b) for b in self.batches]
        self.n_examples = sum(self.sizes)
        self._L = [loss_function(self.model, loss, b) for b in self.batches]
        self.n_hvp = 0
        self.hvps_setup = 0  # products spent choosing the method (none: ``auto`` is a rule)
        self.gradients_setup = 0  # forward + first backward passes spent choosing it (the trial graph)
        self.timings: dict[str, float | str] = {}  # what the choice measured (sizes, failures), no times
        self.max_cache_bytes = default_cache_bytes() if max_cache_bytes is None else int(max_cache_bytes)
        self._graphs: list[CachedGraph | None] = [None] * len(self.batches)
        self._compiled: list = [None] * len(self.batches)
        self._fingerprint = None
        self._watched: list[Tensor] | None = None
        self.cache_rebuilds = 0  # times an in-place change of a parameter/buffer forced a rebuild
        self.method_reason = "given"
        self.conv_reason = "given" if conv != "auto" else "no eligible convolutions"
        self.conv = "native"
        if conv != "native" and method not in FORWARD_MODE and count_eligible(self.model):
            self.conv = self._choose_conv() if conv == "auto" else "forward"
            use_forward_convs(self.model, self.conv == "forward")
        elif conv == "auto" and method in FORWARD_MODE:
            self.conv_reason = "native: forward-mode AD"
        # the method after the conv variant, so a trial graph is built once, with the convs it will use
        self.method = self._choose_method() if method == "auto" else method
        if self.method != CACHED:
            self._graphs = [None] * len(self.batches)  # auto's trial graph: free it
        self.matmat_mode: str | None = None  # "batched" or "loop", set on the first matmat

    # -- the cached first-order graphs ----------------------------------------------------------------
    def _graph(self, i: int) -> CachedGraph:
        """Batch i's cached graph, (re)built if missing or if any parameter/buffer changed in place."""
        if self._watched is None:
            self._watched = watched_tensors(self.model, self.params)
        fp = fingerprint(self.model, self.params, self._watched)
        if self._fingerprint is not None and fp != self._fingerprint:
            self._graphs = [None] * len(self.batches)
            self.cache_rebuilds += 1
        if self._graphs[i] is None:
            self._graphs[i] = CachedGraph(self._L[i], self.params)
            fp = fingerprint(self.model, self.params, self._watched)  # a forward with side effects shows up next time
        self._fingerprint = fp
        return self._graphs[i]

    def drop_cache(self) -> None:
        """Free the cached graphs (they are rebuilt on the next product)."""
        self._graphs = [None] * len(self.batches)

    @property
    def cache_bytes(self) -> int:
        """Measured bytes of the graphs cached now (see `CachedGraph.nbytes`)."""
        return sum(g.nbytes for g in self._graphs if g is not None)

    def _estimate_cache_bytes(self, first: CachedGraph) -> int:
        # saved activations scale with the examples in a batch
        return int(first.nbytes * self.n_examples / max(self.sizes[0], 1))

    @property
    def dim(self) -> int:
        return self.space.dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    # -- method choice ------------------------------------------------------------------------------
    def _choose_method(self) -> str:
        """``auto``: a rule, not a race (timings differ between identical runs on a shared machine, so a
        timed choice was not reproducible). The cached first-order graph is measured fastest on every
        model we benchmark (COST.md: 1.45 vs 1.77 ms per HVP on the 1-layer GPT-2, 8.4 vs 12.9 ms on the
        digits CNN), so it is taken whenever it can be built and its size (a deterministic walk of the
        graph of batch 0, scaled to all batches) fits ``max_cache_bytes``; otherwise double backward.
        Building the trial graph is one forward + first backward (``self.gradients_setup``), no HVP; the
        graph is kept as batch 0's cache when the cached method is chosen. The reason is recorded in
        ``self.method_reason``."""
        try:
            graph = self._graph(0)
            self.gradients_setup += 1
            estimate = self._estimate_cache_bytes(graph)
            self.timings["cache_bytes_estimate"] = float(estimate)
        except Exception as exc:  # noqa: BLE001  (a graph that cannot be kept: fall back)
            self.timings[CACHED] = f"failed: {type(exc).__name__}: {exc}"
            self.method_reason = f"auto: cached graph failed to build ({type(exc).__name__}); double backward"
            return "double_backward"
        if estimate > self.max_cache_bytes:
            self.timings[CACHED] = f"skipped: graphs ≈ {estimate / 2**20:.0f} MiB > max_cache_bytes"
            self.method_reason = (f"auto: cached graphs ≈ {estimate / 2**20:.1f} MiB > max_cache_bytes "
                                  f"{self.max_cache_bytes / 2**20:.1f} MiB; double backward")
            self.drop_cache()
            return "double_backward"
        self.method_reason = (f"auto: cached graphs ≈ {estimate / 2**20:.1f} MiB <= max_cache_bytes "
                              f"{self.max_cache_bytes / 2**20:.1f} MiB")
        return CACHED

    def _choose_conv(self) -> str:
        """``conv="auto"``: a rule from (dtype, device), recorded in ``self.conv_reason``. Forward convs
        were measured faster only in float32 on the CPU (COST.md: 5.3 vs 8.4 ms cached, 9.4 vs 12.9 ms
        double backward), slower in float64 (15.9 vs 14.2 ms); CUDA's cuDNN has fast transposed kernels."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.conv_reason = "auto: float32 on CPU, where transposed convolutions are the slow path"
            return "forward"
        self.conv_reason = f"auto: {str(self.dtype).replace('torch.', '')} on {self.device.type}: native kernels"
        return "native"

    # -- products -----------------------------------------------------------------------------------
    def sum_matvec(self, v: Tensor) -> tuple[Tensor, int]:
        """(Σ_b n_b H_b v in float64, Σ_b n_b): the shardable, unnormalised product."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        x = v.detach().to(device=self.device, dtype=self.dtype)
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for i, n in enumerate(self.sizes):
            total.add_(self._hvp_flat(i, x), alpha=n)  # promotes to float64 in place
        self.n_hvp += 1
        return total, self.n_examples

    def matvec(self, v: Tensor) -> Tensor:
        """H v, returned in ``v``'s dtype and device."""
        if len(self.batches) == 1:
            # One batch: H = H_1, no float64 sum needed. On large models the sum's extra passes over
            # dim-length buffers cost as much as the cached second backward itself (MiniLM: 0.46 s).
            if v.shape != (self.dim,):
                raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
            hv = self._hvp_flat(0, v.detach().to(self.device, self.dtype))
            self.n_hvp += 1
            return hv.to(device=v.device, dtype=v.dtype)
        total, n = self.sum_matvec(v)
        return (total / n).to(device=v.device, dtype=v.dtype)

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def _hvp_flat(self, i: int, x: Tensor) -> Tensor:
        """H_b x on batch i for a flat x in this space's order (a cached graph takes it as it is)."""
        if self.method == CACHED:
            return self._graph(i).hvp_flat(x)
        return self.space.flatten(self._hvp(i, self.space.unflatten(x)))

    def _hvp(self, i: int, vd) -> dict:
        if self.method == CACHED:
            return self._graph(i).hvp(vd)
        if self.method == COMPILED:
            if self._compiled[i] is None:  # compiled lazily, once per batch (tens of seconds: compiled.py)
                from eqlab.analyses.curvature.compiled import CompiledHVP
                self._compiled[i] = CompiledHVP(self._L[i])
            return self._compiled[i](self.params, vd)
        return HVP[self.method](self._L[i], self.params, vd)

    def _hvps(self, i: int, Vd) -> dict:
        """Batched H_b V on batch i, falling back to a loop over columns where batching fails."""
        L = self._L[i]
        if self.matmat_mode != "loop" and self.method != COMPILED:  # compiled: column by column
            try:
                out = self._graph(i).hvps(Vd) if self.method == CACHED else HVPS[self.method](L, self.params, Vd)
                self.matmat_mode = "batched"
                return out
            except Exception as exc:
                if self.matmat_mode == "batched":
                    raise
                self.matmat_mode = "loop"
                self.timings["matmat_batched_error"] = f"{type(exc).__name__}: {exc}"
        cols = [self._hvp(i, {n: t[j] for n, t in Vd.items()}) for j in range(next(iter(Vd.values())).shape[0])]
        return {n: torch.stack([c[n] for c in cols]) for n in self.params}

    def sum_matmat(self, V: Tensor, chunk: int = 32) -> tuple[Tensor, int]:
        """(Σ_b n_b H_b V in float64, Σ_b n_b) for ``V`` of shape (dim, k), ``chunk`` columns at a time."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected a matrix of shape ({self.dim}, k), got {tuple(V.shape)}")
        k = V.shape[1]
        total = torch.zeros(k, self.dim, dtype=torch.float64, device=self.device)
        Vt = V.detach().T.to(device=self.device, dtype=self.dtype)
        for start in range(0, k, chunk):
            Vd = self.space.unflatten(Vt[start:start + chunk].contiguous())
            for i, n in enumerate(self.sizes):
                total[start:start + chunk] += n * self.space.flatten(self._hvps(i, Vd)).to(torch.float64)
        self.n_hvp += k
        return total.T, self.n_examples

    def matmat(self, V: Tensor, chunk: int = 32) -> Tensor:
        """H V for ``V`` of shape (dim, k), returned in ``V``'s dtype and device."""
        total, n = self.sum_matmat(V, chunk)
        return (total / n).to(device=V.device, dtype=V.dtype)

    # -- first order --------------------------------------------------------------------------------
    def sum_gradient(self) -> tuple[Tensor, int, float]:
        """(Σ_b n_b g_b in float64, Σ_b n_b, Σ_b n_b L_b): the shardable, unnormalised gradient and loss."""
        g = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        loss = 0.0
        for L, n in zip(self._L, self.sizes):
            value, grad = value_and_grad(L, self.params)
            g += n * self.space.flatten(grad).to(torch.float64)
            loss += n * float(value)
        return g, self.n_examples, loss

    def gradient(self) -> Tensor:
        g, n, _ = self.sum_gradient()
        return g / n

    def loss(self) -> float:
        _, n, total = self.sum_gradient()
        return total / n

    # -- interfaces and checks ----------------------------------------------------------------------
    def to_scipy(self):
        """A `scipy.sparse.linalg.LinearOperator` with a float64 numpy interface."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            return self.matvec(torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))).numpy()

        def mm(X):
            return self.matmat(torch.from_numpy(np.asarray(X, dtype=np.float64))).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def check_deterministic(self, rtol: float | None = None, seed: int = 0) -> float:
        """Two identical matvecs (and gradients) must agree; returns the measured relative difference.

        With the cached method the second matvec runs on freshly built graphs (a new forward), so
        randomness or forward side effects are caught the same way as without the cache.

        ``rtol`` defaults to 1000 machine epsilons of the working dtype: identical computations on
        the CPU agree bitwise, so anything larger means randomness (dropout, noise) or a side effect.
        """
        rtol = 1000 * torch.finfo(self.dtype).eps if rtol is None else rtol
        v = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        diffs = {}
        a = self.sum_matvec(v)[0]
        if self.method == CACHED:  # a second product on the same graph would agree trivially: rebuild it
            self.drop_cache()
        b = self.sum_matvec(v)[0]
        diffs["matvec"] = float((a - b).norm() / a.norm().clamp_min(1e-300))
        g1, g2 = self.sum_gradient()[0], self.sum_gradient()[0]
        diffs["gradient"] = float((g1 - g2).norm() / g1.norm().clamp_min(1e-300))
        worst = max(diffs.values())
        if not worst <= rtol:  # also catches NaN
            raise RuntimeError(f"the loss is not deterministic: repeated evaluations differ by {diffs} "
                               f"(relative, tolerance {rtol:.1e})")
        return worst
