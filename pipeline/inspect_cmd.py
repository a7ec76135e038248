"""`eqlab inspect`: which transformations does a user's model carry, and do their identities hold?

Discovery walks the model's computation graph; each transformation found is verified in float64 on
the user's batch (a finite group element, the first- and second-order identities) and gets a verdict:
exact, approximate (a measured violation with a known small cause, e.g. a norm eps) or broken, with its
measured violation and the reason, never dropped. Candidates the finders considered and rejected are
stored too (verdict "not_proposed", with a one-line reason) and printed under ``--explain``.
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
    return inspection_rows(found)


NOT_PROPOSED = "not_proposed"   # verdict of a stored row for a candidate a finder considered and rejected


def inspection_rows(found) -> list[dict]:
    """One row per transformation found (verdict exact / approximate / broken) and one per candidate that a
    pattern finder considered and did not propose (verdict "not_proposed", with its one-line reason)."""
    rows = []
    for f in found.found:
        t = f.transformation
        rows.append({"name": t.name, "kind": t.kind, "symmetry": t.family, "params": list(t.params),
                     "generators": int(t.n_generators), "finite": float(f.residuals.get(0, float("nan"))),
                     "first_order": float(f.residuals.get(1, float("nan"))),
                     "second_order": float(f.residuals.get(2, float("nan"))),
                     "holds": bool(f.verified), "reason": f.reason, "verdict": f.verdict,
                     "rounding_level": float(f.tolerance), "inputs_x3": float(f.residual_x3), "cause": f.cause,
                     "site": ""})
    seen = set()
    for r in found.rejected:
        key = (r.site, r.family, r.reason)
        if key in seen:  # several finders (or passes) can reject the same candidate for the same reason
            continue
        seen.add(key)
        nan = float("nan")
        rows.append({"name": f"{r.family}[{r.site}]", "kind": "", "symmetry": r.family, "params": [],
                     "generators": 0, "finite": nan, "first_order": nan, "second_order": nan, "holds": False,
                     "reason": r.reason, "verdict": NOT_PROPOSED, "rounding_level": nan, "inputs_x3": nan,
                     "cause": "", "site": r.site})
    return rows


def proposed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("verdict") != NOT_PROPOSED]


def write_inspection(rows: list[dict], results: Path, ref: str) -> Path:
    run_id = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "_"
                     for ch in Path(ref.split(":")[0]).stem + ("_" + ref.rsplit(":", 1)[1] if ":" in ref else ""))
    run_id = run_id.strip("_") or "model"  # a folder name under inspections/: never empty
    return store.write_rows(results, "inspections", run_id, store.RUN_LEVEL, rows, study="inspect")


def format_inspection(ref: str, rows: list[dict], explain: bool = False) -> str:
    found = proposed(rows)
    count = {v: sum(r.get("verdict") == v for r in found) for v in ("exact", "approximate", "broken")}
    lines = [f"{ref}: {len(found)} transformations found: {count['exact']} exact, {count['approximate']} "
             f"approximate, {count['broken']} broken (float64)"]
    w = max([len(r["name"]) for r in found] + [14])
    lines.append(f"  {'transformation':<{w}}  {'kind':<10}  {'gens':>5}  {'1st order':>9}  {'2nd order':>9}  verdict")
    for r in found:
        v = r.get("verdict", "exact" if r["holds"] else "broken")
        verdict = "exact" if v == "exact" else f"{v.upper()}: {r['reason']}"
        lines.append(f"  {r['name']:<{w}}  {r['kind']:<10}  {r['generators']:>5}  {r['first_order']:>9.1e}  "
                     f"{r['second_order']:>9.1e}  {verdict}")
    if explain:
        rejected = [r for r in rows if r.get("verdict") == NOT_PROPOSED]
        lines.append(f"considered and not proposed ({len(rejected)}):")
        by_site: dict[str, list] = {}
        for r in rejected:
            by_site.setdefault(r["site"], []).append(r)
        for site, rs in by_site.items():
            lines.append(f"  {site}:")
            lines += [f"    {r['symmetry']}: {r['reason']}" for r in rs]
    return "\n".join(lines)


def to_json(rows: list[dict], explain: bool = False) -> str:
    clean = lambda v: None if isinstance(v, float) and v != v else v  # NaN is not JSON
    return json.dumps([{k: clean(v) for k, v in r.items()} for r in (rows if explain else proposed(rows))])


def main(argv=None) -> int:
    """``python -m eqlab.pipeline.inspect_cmd MODEL [--explain] [--json]``: what `eqlab inspect` does, with
    the considered-and-rejected candidates printed under --explain."""
    import argparse

    from eqlab.pipeline.userfunc import parse_overrides

    ap = argparse.ArgumentParser(prog="python -m eqlab.pipeline.inspect_cmd")
    ap.add_argument("model")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--explain", action="store_true", help="also say which candidates were rejected and why")
    ap.add_argument("--results", default="results/inspect")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--config", action="append", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    rows = inspect_model(args.model, examples=args.examples, overrides=parse_overrides(args.config))
    path = write_inspection(rows, Path(args.results), args.model)
    print(to_json(rows, args.explain) if args.json else format_inspection(args.model, rows, args.explain))
    if not args.json:
        print(f"table: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
