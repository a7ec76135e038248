"""`eqlab inspect`: which transformations does a user's model carry, and do their identities hold?

Discovery walks the model's computation graph; each transformation found is verified in float64 on
the user's batch (a finite group element, the first- and second-order identities). Broken ones are
listed with their measured violation and the likely reason, never dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from eqlab.analyses.discover import discover
from eqlab.pipeline import store
from eqlab.pipeline.userfunc import UserSource, input_tensors, n_examples, shares_leading_dim

TRACE_EXAMPLES = 4  # examples the computation graph is traced on (when the batch can be cut)


def inspect_model(ref: str, examples: int = 32, probes: int = 1, seed: int = 0, overrides=()) -> list[dict]:
    """The batch is used as the user gave it, except that when inputs and targets share their first
    dimension only the first ``examples`` verify the identities (and the first few are traced). A batch
    whose targets have another first dimension (a token-level loss on (batch * tokens) targets) is used
    whole for both."""
    model, loss, batches = UserSource(ref, overrides=tuple(overrides))(torch.float64)
    batch = batches[0]
    if shares_leading_dim(batch):
        verify, trace = examples, TRACE_EXAMPLES
    else:  # no rule to cut it by: larger than every first dimension, so nothing is cut
        whole = max([n_examples(batch)] + [int(t.shape[0]) for t in input_tensors(batch[0]) if t.dim()])
        verify = trace = whole
    found = discover(model, loss, batch, verify_examples=verify, trace_examples=trace, probes=probes, seed=seed)
    rows = []
    for f in found.found:
        t = f.transformation
        rows.append({"name": t.name, "kind": t.kind, "symmetry": t.family, "params": list(t.params),
                     "generators": int(t.n_generators), "finite": float(f.residuals.get(0, float("nan"))),
                     "first_order": float(f.residuals.get(1, float("nan"))),
                     "second_order": float(f.residuals.get(2, float("nan"))),
                     "holds": bool(f.verified), "reason": f.reason})
    return rows


def write_inspection(rows: list[dict], results: Path, ref: str) -> Path:
    run_id = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_"
                     for ch in Path(ref.split(":")[0]).stem + ("_" + ref.rsplit(":", 1)[1] if ":" in ref else ""))
    run_id = run_id.strip("_") or "model"  # a folder name under inspections/: never empty
    return store.write_rows(results, "inspections", run_id, store.RUN_LEVEL, rows, study="inspect")


def format_inspection(ref: str, rows: list[dict]) -> str:
    lines = [f"{ref}: {len(rows)} transformations found, {sum(r['holds'] for r in rows)} verified (float64)"]
    w = max([len(r["name"]) for r in rows] + [14])
    lines.append(f"  {'transformation':<{w}}  {'kind':<10}  {'gens':>5}  {'1st order':>9}  {'2nd order':>9}  verdict")
    for r in rows:
        verdict = "holds" if r["holds"] else f"BROKEN: {r['reason']}"
        lines.append(f"  {r['name']:<{w}}  {r['kind']:<10}  {r['generators']:>5}  {r['first_order']:>9.1e}  "
                     f"{r['second_order']:>9.1e}  {verdict}")
    return "\n".join(lines)


def to_json(rows: list[dict]) -> str:
    clean = lambda v: None if isinstance(v, float) and v != v else v  # NaN is not JSON
    return json.dumps([{k: clean(v) for k, v in r.items()} for r in rows])
