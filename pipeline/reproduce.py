"""`eqlab reproduce`: the preset studies behind each finding (pipeline/studies/reproduce/*.toml), run into
their own results folders, and each finding's verdicts read back from the `findings` table.

`--scale small` is sized for a 2-core machine (real model families, few steps); `--scale full` is the
cluster-size version of the same study, meant for `eqlab submit` (its expected cost is in its file). Flat
directions, gradient–Hessian alignment, block anisotropy, indefiniteness and the discrete saddles come from
the same per-checkpoint stage, so they share a preset: `all` runs each preset once.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SCALES = ("small", "full")


@dataclass(frozen=True)
class Finding:
    name: str        # the command-line name
    finding: str     # the `finding` column its rows carry
    preset: str      # pipeline/studies/reproduce/<preset>-<scale>.toml
    tests: str       # one line: what it tests
    also: tuple[str, ...] = ()  # further `finding` names the same rows function writes (one verdict line each)
    measured: tuple[str, ...] = ()  # measurement-only `finding` names (no verdict): one line of their statistics

    @property
    def row_findings(self) -> tuple[str, ...]:
        return (self.finding, *self.also)


FINDINGS = (
    Finding("flat", "flat_symmetry_direction", "curvature",
            "flat and sharp symmetry directions: the Hessian's Rayleigh quotient along each verified symmetry's "
            "generators against the second-order identity (0 for translations and BatchNorm scale, −⟨g_P, θ_P⟩/‖ξ‖² "
            "for ReLU rescaling); under weight decay gamma, 2 gamma along a symmetric generator at a stationary point "
            "of L + gamma/2 |theta|^2 (the checkpoint relaxed by L-BFGS); control: random directions on the same "
            "parameters", also=("wd_stationary_rayleigh",)),
    Finding("align", "gradient_hessian_alignment", "curvature",
            "gradient–Hessian alignment: for each top Hessian eigenpair (λ, u), ⟨u, Aᵀg⟩ against −λ⟨u, Aθ⟩; "
            "control: a random affine field on the same parameters"),
    Finding("blocks", "block_orbit_congruence", "curvature",
            "curvature anisotropy across blocks: each block's top eigenvalue (heads Q/K/V/O, unit groups, BN filters) "
            "moved along a rescaling orbit by c scales by exactly c^-2 / c^2, and the log-log slope of the sharpness "
            "ratio against the conserved norm ratio is 1 along the orbit (across heads: measured, an open question); "
            "control: the same move on one side only; SGD against Adam: the blocks' log-sharpness spread per "
            "optimizer (a measurement)", also=("block_sharpness_imbalance",), measured=("block_anisotropy_optimizer",)),
    Finding("indefinite", "indefiniteness", "curvature",
            "indefiniteness of normalised networks: a scale-invariant block with g_S != 0 has lambda_min <= "
            "-|g_S|^2/(mu_+ |theta_S|^2) (Rayleigh-Ritz on span{theta_S, g_S}), lambda_min by Lanczos; control: the "
            "convex classifier head (lambda_min = 0) against the same bound; the full Hessian's lambda_min against "
            "the sharpest block bound, and its SLQ negative share tr(H-)/tr|H| next to |g_S| (a measurement)",
            also=("indefinite_hessian_min",), measured=("indefinite_negative_share",)),
    Finding("drift", "conservation_drift_slope", "drift",
            "conservation under real optimizers: the one-step drift ‖ΔQ‖ of each conserved quantity against the "
            "learning rate across an lr sweep, log–log slope 2 for plain SGD (the η² law), 1 for Adam and for SGD "
            "with weight decay; control: each fit against the other order"),
    Finding("saddles", "discrete_saddle_spectrum", "curvature",
            "discrete symmetries: at a dead unit or a duplicated pair (fixed points of a unit swap) the Hessian on "
            "the unit's subspace is the first-order block [[0, B^T], [B, 0]] (+ M/2 for a split), invariant under "
            "the swap, stable under L2 iff gamma > -lambda_min; control: the same statistics at trained units",
            also=("discrete_subspace_invariance", "discrete_saddle_wd_threshold")),
)
BY_NAME = {f.name: f for f in FINDINGS}


class ReproduceError(ValueError):
    """Bad input to `eqlab reproduce` (one line)."""


def preset_text(preset: str, scale: str) -> tuple[str, str]:
    """(TOML text, where it lives) of a shipped preset."""
    ref = resources.files("eqlab.pipeline.studies").joinpath("reproduce", f"{preset}-{scale}.toml")
    return ref.read_text(), str(ref)


def preset_path(preset: str, scale: str) -> Path:
    return Path(str(resources.files("eqlab.pipeline.studies").joinpath("reproduce", f"{preset}-{scale}.toml")))


def select(which: str | None) -> list[Finding]:
    if which in (None, "all"):
        return list(FINDINGS)
    if which not in BY_NAME:
        raise ReproduceError(f"reproduce: unknown finding {which!r} (choose from {', '.join(BY_NAME)}, all; "
                             "eqlab reproduce --list says what each tests)")
    return [BY_NAME[which]]


def load_presets(findings: list[Finding], scale: str):
    """[(preset name, Study, [findings])] in order, each preset once; every file validated before anything runs."""
    from eqlab.pipeline.study import parse_study

    if scale not in SCALES:
        raise ReproduceError(f"reproduce: --scale must be one of {', '.join(SCALES)} (got {scale!r})")
    out: dict[str, tuple] = {}
    for f in findings:
        if f.preset not in out:
            text, where = preset_text(f.preset, scale)
            out[f.preset] = (parse_study(tomllib.loads(text), where), [])
        out[f.preset][1].append(f)
    return [(name, study, fs) for name, (study, fs) in out.items()]


def list_lines() -> list[str]:
    width = max(len(f.name) for f in FINDINGS)
    return [f"{f.name:<{width}}  {f.finding}: {f.tests} [preset {f.preset}-small.toml / {f.preset}-full.toml]"
            for f in FINDINGS]


def verdict_lines(results: Path, study, findings: list[Finding]) -> list[str]:
    """Each finding's verdict counts, prediction rows and control rows apart, read from the findings table,
    and the model families its rows are on (a study-level row's sweep stands for its runs)."""
    from eqlab.pipeline.findings_drift import sweeps

    from eqlab.pipeline.findings_optimizers import comparison_groups

    family = {s.run_id: s.family for s in study.runs}
    family.update({name: specs[0].family for name, specs in sweeps(study).items()})
    family.update({name: specs[0].family for name, specs in comparison_groups(study).items()})
    return ([_verdict_line(results, f.name, name, family) for f in findings for name in f.row_findings]
            + [_measurement_line(results, f.name, name) for f in findings for name in f.measured])


def _measurement_line(results: Path, cli_name: str, finding: str) -> str:
    """A measurement-only finding: its statistic's mean ± std per (run or group, transformation, optimizer)."""
    from eqlab.pipeline.query import run_query

    _, rows = run_query(results, f"""select run_id, transformation, optimizer, avg(statistic), avg(statistic_std),
                                      count(*) from findings where finding = '{finding}' group by all order by all""")
    parts = [f"{r} {t} {o}: {m:.3g}" + (f" +- {sd:.2g}" if sd is not None else "") + (f" ({n} rows)" if n > 1 else "")
             for r, t, o, m, sd, n in rows if m is not None][:12]
    return f"{cli_name} ({finding}): measurements, no prediction: {'; '.join(parts) or 'no rows'}"


def _verdict_line(results: Path, cli_name: str, finding: str, family: dict) -> str:
    from eqlab.pipeline.query import run_query

    # a measurement-only row (e.g. block_sharpness) has no verdict and is not counted
    _, rows = run_query(results, f"""select control, verdict, count(*) from findings
                                      where finding = '{finding}' and verdict is not null group by all order by all""")
    _, ids = run_query(results, f"select distinct run_id from findings where finding = '{finding}'")
    fams = sorted({family.get(i, "?") for (i,) in ids})
    parts = {False: [], True: []}
    for control, verdict, n in rows:
        parts[bool(control)].append(f"{n} {verdict}")
    return (f"{cli_name} ({finding}): predictions: {', '.join(parts[False]) or 'no rows'}; "
            f"negative controls: {', '.join(parts[True]) or 'no rows'}"
            + (f"; model families: {', '.join(fams)}" if fams else ""))


def results_for(base: Path | None, preset: str, several: bool) -> Path:
    if base is None:
        return Path("results") / f"reproduce-{preset}"
    return Path(base) / preset if several else Path(base)
