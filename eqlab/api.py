"""``eqlab.hessian(model, loss, batch)``: the Python entry point to the curvature engine.

The inputs are held to the contract of ``eqlab spectrum FILE.py:FUNC`` (README "Command line";
`pipeline.userfunc.check_contract`, the same checker, one line naming each breach): ``model`` an
``nn.Module`` with trainable floating-point parameters, ``model(inputs)`` (``model(**inputs)`` for a dict)
a tensor or a ``ModelOutput``, ``loss(outputs, targets)`` a finite scalar mean that depends on the
parameters. Here ``batch`` may also be a list of such ``(inputs, targets)`` pairs (the example-weighted
mean over them). The checker runs one forward per batch (counted in ``forwards_setup``).

This module sits above `analyses` and `pipeline` (it joins the pipeline's contract to the analyses'
operator), so neither has to import the other; `import eqlab` reaches it only when ``hessian`` is used.
"""
from __future__ import annotations


def hessian(model, loss, batch, *, names=None, block: str | None = None, dtype=None, method: str = "auto",
            conv: str = "auto", max_cache_bytes: int | None = None):
    """A `eqlab.analyses.curvature.api.Hessian` of ``loss`` over ``batch`` at the model's parameters now.

    ``names`` (parameter names) or ``block`` (a regex on them) select a block; ``dtype`` the products'
    dtype (default the model's); ``method``/``conv`` as `HessianOperator` (``"auto"``: a recorded rule).
    The model is not touched (the operator works on a private copy). Breaches of the contract raise
    `pipeline.userfunc.UserModelError` (a ValueError) in one line; active dropout raises ValueError."""
    from eqlab.analyses.curvature.api import Hessian
    from eqlab.analyses.curvature.operator import _as_batch_list
    from eqlab.pipeline.userfunc import check_contract

    batches = _as_batch_list(batch)
    for i, b in enumerate(batches):
        check_contract({"model": model, "batch": b, "loss": loss},
                       "eqlab.hessian" + (f": batch {i}" if len(batches) > 1 else ""))
    H = Hessian(model, loss, batches, names=names, block=block, dtype=dtype, method=method, conv=conv,
                max_cache_bytes=max_cache_bytes)
    H.forwards_setup += len(batches)
    return H
