"""Turn the tidy rows into bench/results/latest.parquet and a Markdown report with eqlab/peer ratios
and the targets of issue 4, judged from the numbers (met / missed), never adjusted."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from bench.models import CNN_OPTIONS, GPT_OPTIONS

PEERS = ("curvlinops", "pyhessian", "eigenthings")


def _machine(threads) -> str:
    import torch
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    load = os.getloadavg()
    return (f"{cpu}; {os.cpu_count()} cores (shared with other engineers' jobs; load average at the end "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}); Python {platform.python_version()}, torch "
            f"{torch.__version__}, torch threads {threads} in-process, 1 per Ray actor in M8")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for dist in ("PyHessian", "curvlinops-for-pytorch", "hessian-eigenthings", "transformers", "scipy", "numpy"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} missing")
    return ", ".join(out)


def _table(df: pd.DataFrame, metric: str, ratio_to_eqlab: bool = False) -> str:
    d = df[df.metric == metric]
    if d.empty:
        return "_no rows_\n"
    piv = d.pivot_table(index=["model", "setting"], columns="library", values="value", aggfunc="first")
    cols = [c for c in ["eqlab"] + [c for c in piv.columns if c.startswith("eqlab[")] + list(PEERS) +
            [c for c in piv.columns if c not in ("eqlab",) + PEERS and not c.startswith("eqlab[")]
            if c in piv.columns]
    piv = piv[cols]
    if ratio_to_eqlab and "eqlab" in piv.columns:
        for p in PEERS:
            if p in piv.columns:
                piv[f"eqlab/{p}"] = piv["eqlab"] / piv[p]
    fmt = lambda x: "—" if pd.isna(x) else (f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}")  # noqa: E731
    lines = ["| model | setting | " + " | ".join(piv.columns) + " |",
             "|---|---|" + "---|" * len(piv.columns)]
    for (model, setting), r in piv.iterrows():
        lines.append(f"| {model} | {setting} | " + " | ".join(fmt(x) for x in r.values) + " |")
    return "\n".join(lines) + "\n"


def _targets(df: pd.DataFrame) -> list[str]:
    out = []

    def get(metric, model, library, setting_prefix=""):
        d = df[(df.metric == metric) & (df.model == model) & (df.library == library) &
               df.setting.str.startswith(setting_prefix)]
        return d.value.tolist()

    # T0 (issue 14): whole call (construction included) ahead of the fastest exact peer at equal or
    # better accuracy (top-5 within 1e-3 of the truth / reference), on every model and dtype measured
    out.extend(_whole_call_targets(df))
    # T1 (issue 4, solve+construction): time to top-5 at 1e-3 <= half the fastest peer's, with <= 40 HVPs
    for model in sorted(df[df.metric == "M3_best_time"].model.unique()):
        d = df[(df.metric == "M3_best_time") & (df.model == model) & df.setting.str.endswith("median")
               & ~df.setting.str.startswith("float64")]
        peers = d[d.library.isin(PEERS)]
        fastest = None if peers.empty else peers.loc[peers.value.idxmin()]
        for lib in ("eqlab", "eqlab[compiled]"):
            t, hv = d[d.library == lib].value.tolist(), get("M3_best_hvps", model, lib)
            if not t:
                continue
            head = f"- **Top-5 at 1e-3, {model}**: eqlab" if lib == "eqlab" else \
                f"- **Top-5 at 1e-3, {model}, opt-in `method=\"compiled\"`**:"
            if fastest is None:
                out.append(f"{head} {t[0]:.3f} s; no peer met 1e-3 at any setting")
                continue
            ok = t[0] <= 0.5 * fastest.value and hv and hv[0] <= 40
            cost = "" if lib == "eqlab" else (f"; after a one-time compile of {get('M3_compile_time', model, lib)[0]:.0f} s "
                                              "with a warm inductor cache, ≈ 35 s cold, not counted")
            out.append(f"{head} {t[0]:.3f} s with {hv[0]:.0f} HVPs vs fastest peer {fastest.library} "
                       f"{fastest.value:.3f} s (ratio {t[0] / fastest.value:.2f}; target ≤ 0.5 and ≤ 40 HVPs{cost}): "
                       f"**{'met' if ok else 'missed'}**")
    # T2: HVP/gradient <= 2.5 on CNN and transformer
    for model in ("cnn_b512", "gpt2_modadd"):
        v = get("M1_hvp_over_grad", model, "eqlab", "median")
        m = get("M1_hvp_over_grad", model, "eqlab", "min")
        if v:
            out.append(f"- **HVP/gradient ≤ 2.5, {model}**: eqlab (auto) {v[0]:.2f} (medians), {m[0]:.2f} (minima): "
                       f"**{'met' if v[0] <= 2.5 else 'missed'}**")
    # T3: density W1 <= 1% of width with no more HVPs than the best peer at the same error
    for model in sorted(df[df.metric == "M5_w1_over_width"].model.unique()):
        d = df[(df.metric == "M5_w1_over_width") & (df.model == model)].copy()
        d["hvps"] = d.setting.str.extract(r"hvps=(\d+)").astype(float)
        eq = d[(d.library == "eqlab") & (d.value <= 0.01)]
        pe = d[d.library.isin(PEERS) & (d.value <= 0.01)]
        if eq.empty:
            out.append(f"- **Density W1 ≤ 1%, {model}**: eqlab never reached it: **missed**")
            continue
        e = eq.loc[eq.hvps.idxmin()]
        if pe.empty:
            out.append(f"- **Density W1 ≤ 1%, {model}**: eqlab at {e.hvps:.0f} HVPs (W1 {e.value:.2e}); "
                       "no peer reached 1%: **met**")
        else:
            p = pe.loc[pe.hvps.idxmin()]
            out.append(f"- **Density W1 ≤ 1%, {model}**: eqlab needs {e.hvps:.0f} HVPs ({e.setting.split(' hvps')[0]}), "
                       f"best peer {p.library} {p.hvps:.0f} ({p.setting.split(' hvps')[0]}): "
                       f"**{'met' if e.hvps <= p.hvps else 'missed'}**")
    # T4: 2-actor efficiency >= 0.85
    for k, what in ((1, "one vector per round trip (single-vector Lanczos)"),
                    (4, "4 vectors per round trip (SLQ's lockstep probes, Hutch++, block Lanczos)")):
        v = get("M8_parallel_efficiency", "cnn_all1797", "eqlab", f"k={k} t1/(2 t2) medians")
        m = get("M8_parallel_efficiency", "cnn_all1797", "eqlab", f"k={k} t1/(2 t2) minima")
        r = get("M8_parallel_efficiency", "cnn_all1797", "eqlab", f"k={k} Ray calls only t1/(2 t2) medians")
        if v:
            ray_only = f"; the same actors over plain Ray calls: {r[0]:.2f}" if r else ""
            out.append(f"- **2-actor efficiency ≥ 0.85 (all 1797 digits), {what}**: {v[0]:.2f} (medians), "
                       f"{m[0]:.2f} (minima){ray_only}: **{'met' if v[0] >= 0.85 else 'missed'}**")
    return out


def _whole_call_targets(df: pd.DataFrame) -> list[str]:
    out = []
    small = df[(df.metric == "M3_best_time") & df.setting.str.endswith(" median")]
    for (model, dt), d in small.assign(dt=small.setting.str.extract(r"^(float\d+) ")[0].fillna("float32")) \
            .groupby(["model", "dt"]):
        eq, peers = d[d.library == "eqlab"], d[d.library.isin(PEERS)]
        if eq.empty:
            out.append(f"- **Whole call ahead of the fastest exact peer, {model} {dt}**: eqlab met top-5 at 1e-3 "
                       "at no swept setting: **missed**")
            continue
        t = float(eq.value.iloc[0])
        if peers.empty:
            out.append(f"- **Whole call ahead of the fastest exact peer, {model} {dt}**: eqlab {t:.3f} s; "
                       "no peer met 1e-3: **met**")
            continue
        f = peers.loc[peers.value.idxmin()]
        out.append(f"- **Whole call ahead of the fastest exact peer, {model} {dt}** (top-5 within 1e-3 of dense "
                   f"float64 eigh, construction included, medians): eqlab {t:.3f} s vs {f.library} {f.value:.3f} s "
                   f"(ratio {t / f.value:.2f}): **{'met' if t < f.value else 'missed'}**")
    big = df[(df.metric == "R_top5_whole_time") & df.setting.str.contains(" median of ")]
    errs = df[df.metric == "R_top5_err"]
    for model, d in big.groupby("model"):
        err = {r.library: r.value for r in errs[errs.model == model].itertuples()}
        eq = d[d.library == "eqlab"]
        if eq.empty:
            continue
        t, e = float(eq.value.iloc[0]), err.get("eqlab", float("nan"))
        ok_peers = d[d.library.isin(PEERS) & d.library.map(lambda lib: err.get(lib, np.inf) <= 1e-3)]
        others = ", ".join(f"{r.library} {r.value:.1f} s (err {err.get(r.library, np.nan):.1e})"
                           for r in d[d.library.isin(PEERS)].itertuples())
        head = (f"- **Whole call ahead of the fastest exact peer, {model} float32** (top-5 within 1e-3 of the "
                f"float64 ARPACK reference, construction included, medians): eqlab {t:.1f} s (err {e:.1e}); "
                f"peers {others}")
        if not e <= 1e-3:
            out.append(f"{head}: **missed** (eqlab not within 1e-3)")
        elif ok_peers.empty:
            out.append(f"{head}; no peer within 1e-3: **met**")
        else:
            f = ok_peers.loc[ok_peers.value.idxmin()]
            out.append(f"{head}; fastest within 1e-3 {f.library} (ratio {t / f.value:.2f}): "
                       f"**{'met' if t < f.value else 'missed'}**")
    return out


SECTIONS = [
    ("Problem sizes", "n_params", False),
    ("Ground-truth cross-check (dense fwd-over-rev vs double-backward matvec)", "truth_check", False),
    ("M1 — HVP / gradient time (float32, one batch; PyHessian reuses a stored graph, no forward)", "M1_hvp_over_grad", False),
    ("M1 — raw times (s)", "M1_time", False),
    ("M2 — matvec relative error vs dense float64 H", "M2_matvec_rel_err", False),
    ("M3 — oracle: first eqlab Lanczos step at which top-5 are within 1e-3", "M3_oracle_hvps", False),
    ("M3 — sweep: top-5 max relative error per setting (float32 runs vs float64 truth)", "M3_sweep_err", False),
    ("M3 — sweep: HVPs per setting", "M3_sweep_hvps", False),
    ("M3 — cheapest passing setting: HVPs", "M3_best_hvps", False),
    ("M3 — cheapest passing setting: WHOLE-CALL wall time, the library's construction included (s, fresh operator per repeat, interleaved; float64 rows at the float32 setting, their error in the next table)", "M3_best_time", False),
    ("M3 — float64 whole call: top-5 error at the float32 setting", "M3_f64_err", False),
    ("M3 — cheapest passing setting: solve time alone, operator built beforehand (s, interleaved)", "M3_solve_time", False),
    ("M3 — first-order passes spent at construction", "M3_setup_gradients", False),
    ("M3 — eqlab[compiled]: one-time torch.compile cost (s, not in the times above; inductor's on-disk cache may be warm from earlier runs, cold ≈ 35 s for the GPT-2)", "M3_compile_time", False),
    ("M4 — trace relative error (float64)", "M4_trace_rel_err", False),
    ("M5 — SLQ density W1 / spectral width (float64)", "M5_w1_over_width", False),
    ("M6 — per-block top-1 relative error (float64)", "M6_block_top1_err", False),
    ("M8 — sharded vs single-process matvec (float64)", "M8_sharded_vs_single", False),
    ("M8 — matvec time, Ray actors, 1 thread each, over the same-node channel (default) and over Ray calls only (s)", "M8_matvec_time", False),
    ("M8 — parallel efficiency t1 / (2·t2)", "M8_parallel_efficiency", False),
    ("M8 — per-product overhead of 2 actors over perfect halving, t2 − t1/2 (ms, medians)", "M8_overhead", False),
    ("Realistic sizes — reference (float64 ARPACK, ncv 20, tol 1e-10, on eqlab's float64 operator; no dense truth at 22M parameters)", "R_reference", False),
    ("Realistic sizes — reference: true relative residuals", "R_reference_residual", False),
    ("Realistic sizes — reference: cost", "R_reference_cost", False),
    ("Realistic sizes — top-5: WHOLE-CALL wall time (s, construction included, float32, 1 thread, one process, interleaved)", "R_top5_whole_time", False),
    ("Realistic sizes — top-5: max relative error vs the reference", "R_top5_err", False),
    ("Realistic sizes — top-5: HVPs, setup included", "R_top5_hvps", False),
    ("Realistic sizes — top-5: eqlab pairs reported converged (residual rule + verification block)", "R_top5_converged", False),
    ("Realistic sizes — float32 vs float64 product (the floor of any float32 residual)", "R_matvec_f32_vs_f64", False),
    ("Realistic sizes — top-5: first-order passes at construction", "R_top5_gradients_setup", False),
    ("Realistic sizes — top-5: construction time alone (s)", "R_top5_setup_time", False),
    ("Realistic sizes — top-5: peak memory of the call above the process's resident size before it (MB; includes the harness's 90 MB model copy)", "R_top5_peak_mb", False),
    ("Realistic sizes — trace estimate at 30 products (no exact trace at this size)", "R_trace_estimate", False),
    ("Realistic sizes — trace: distance to the median of the libraries' estimates", "R_trace_vs_median", False),
    ("Realistic sizes — trace: whole-call time (s)", "R_trace_time", False),
    ("Realistic sizes — SLQ density: whole-call time (s)", "R_density_time", False),
    ("Realistic sizes — SLQ density: top Ritz node vs reference λ1", "R_density_top_node_err", False),
    ("Realistic sizes — wall time of the part (s)", "R_wall", False),
    ("MiniLM-L6 — HVP / gradient (float32, batch 4×64, subprocess per library; eqlab_dbl/_fwd/_cached = its three exact methods)", "MiniLM_hvp_over_grad", False),
    ("MiniLM-L6 — HVP time (s)", "MiniLM_hvp_time", False),
    ("MiniLM-L6 — peak RSS (MB)", "MiniLM_peak_rss", False),
]


def write(rows, notes, outdir: Path, threads, repeats, quick, seconds):
    outdir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=["metric", "model", "library", "setting", "value", "unit"])
    df.to_parquet(outdir / "latest.parquet", index=False)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Curvature benchmark (issue 4) — {now}", "",
          f"- Machine: {_machine(threads)}",
          f"- Mode: {'quick' if quick else 'full'}; timing repeats {repeats} for M1 (interleaved, rotated order, "
          "warm-up 3), median and minimum reported; total wall time "
          f"{seconds:.0f} s. Timings are noisy: other engineers' jobs share the 2 cores.",
          f"- Versions: {_versions()} (pins: bench/requirements*.txt).",
          f"- Models: digits CNN (`digits_cnn` {CNN_OPTIONS}, BatchNorm **frozen (eval mode)** after 200 "
          "SGD steps, so every peer differentiates the same function; PyHessian forces eval mode anyway) on a fixed "
          "512 batch (`cnn_b512`) and on all 1797 digits as batches of 600/500/400/297 (`cnn_all1797`); "
          f"1-layer GPT-2 on a+b mod 11 (`modadd_gpt2` {GPT_OPTIONS}, eager attention, 300 Adam steps) "
          "(`gpt2_modadd`); realistic sizes (`bench/realistic.py`): MiniLM-L6 with its real pretrained weights "
          "(`minilm_l6`, 22.6M trainable, pooler frozen, eager attention, batch 4×64 of real text, half squared "
          "error of the mean-pooled embedding against a fixed random target) and a GPT-2-small-shaped LM "
          "(`gpt2s_3l`: GPT-2 small's blocks, 768 wide, 12 heads, MLP 3072, 3 layers, byte vocabulary, 21.5M, "
          "40 Adam steps on real text, next-byte cross-entropy on a held-out 2×64 batch; full GPT-2 small's "
          "124M needs a ≈ 40 GB Lanczos basis at m = 40, more than this machine). "
          "Problems were sized down from the brief's (4, 8)/16 CNN and d=16 transformer so dense truth builds in "
          "about a minute on the shared machine.", "",
          "## Targets", ""] + _targets(df) + [""]
    for title, metric, ratio in SECTIONS:
        md += [f"## {title}", "", _table(df, metric, ratio)]
    md += ["## Notes (failures and choices, recorded as results)", ""] + [f"- {' '.join(n.split())}" for n in dict.fromkeys(notes)] + [""]
    (outdir / "latest.md").write_text("\n".join(md))
