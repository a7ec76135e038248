"""GPU check (issue 10): one small GPT-2 run trained by 1 Ray Train worker on a machine with CUDA, the top
Hessian eigenvalues of its last checkpoint on a GPU actor (float64 and float32 products), and the same
checkpoint's on a CPU actor in float64; prints the relative differences and timings and writes them to
bench/results/gpu_check.md.

    python -m bench.gpu_check                  # a CUDA machine: ~2-3 min on one H200 host, Ray start included
    python -m bench.gpu_check --allow-cpu      # no CUDA: the same path with the "GPU" actor on the CPU
    python -m bench.gpu_check --allow-cpu --n-embd 32 --n-layer 1 --steps 20 --examples 32   # a 2-core laptop

Without CUDA (and without --allow-cpu) it says so and exits 2, before starting anything. Exit 1: the
comparison failed (or its negative control passed); 0: it held.

What it runs of the pipeline, unchanged: a temporary study file through `pipeline.study.load_study`
(with `[spectra] num_gpus = 1` on CUDA), `pipeline.cluster.connect` (the embedded loopback cluster; Ray
detects the GPUs itself), `pipeline.train.train_run` (Ray Train `TorchTrainer`, one worker with one GPU:
`gpus_per_worker`, the model and data on `ray.train.torch.get_device()`), the checkpoint files,
`spectra.FamilySource`, `ShardedHessian` with the study's `num_gpus` (its actor asks Ray for the GPU and
keeps its model there: `pipeline.devices.assigned_device`) and the Lanczos call of `spectrum_rows` (same
arguments; called directly here for its eigenvectors and error bounds). What it adds: where each actor
computed (`ShardedHessian.where`), and where training really ran, read from the storage locations of the
checkpoint's Adam state (`optimizer.pt` keeps the device it was saved from; the weights file is always
written from CPU copies).

The comparison. Each Lanczos run returns, per eigenvalue θ_i of its own operator, a bound err_i =
min(r_i, r_i²/gap_i) on |θ_i − λ_i| (true residual r_i; `analyses.curvature.lanczos`). The device's
operator differs from the CPU float64 one by rounding, E = H_dev − H_cpu, which moves λ_i by v_iᵀ E v_i
to first order (v_i the CPU eigenvector), plus at most ‖E v_i‖²/gap_i. So the prediction "the device
computes the CPU float64 spectrum" allows |θ_dev,i − θ_cpu,i| ≤ err_dev,i + err_cpu,i + |v_iᵀ E v_i| +
‖E v_i‖²/gap_i, with E v_i measured (one product on each pool per eigenvalue). Negative control: the
device's float64 spectrum of the checkpoint one optimizer step before the last, against the CPU's of
the last, with the same allowance. It must be `violated` (else the check cannot discriminate:
`inconclusive`), and by the expected amount: the first-order shift v_iᵀ(H_prev − H_last)v_i, measured
on the CPU pool, which the report prints beside the measured difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.md"
NO_CUDA_EXIT = 2


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--allow-cpu", action="store_true",
                    help="without CUDA, run the same path with the 'GPU' actor on the CPU (checks the script)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"markdown file for the results (default with CUDA: {DEFAULT_OUT.relative_to(ROOT)}; "
                         "with --allow-cpu: none)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60, help="training steps (checkpoints at 0 and the last)")
    ap.add_argument("--examples", type=int, default=32, help="windows in the fixed Hessian batch")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=min(16, os.cpu_count() or 2),
                    help="logical CPUs of the embedded Ray cluster (default: min(16, this machine's)); the "
                         "training worker and each Hessian actor get half")
    args = ap.parse_args(argv)
    for name in ("n_layer", "n_embd", "n_head", "seq_len", "steps", "examples", "top_k"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_embd % args.n_head:
        ap.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the negative control needs the checkpoint one step before the last)")
    if args.cpus < 2:
        ap.error("--cpus must be >= 2 (one for the CPU reference actor, one for the device actor)")
    return args


def cuda_report(torch) -> tuple[bool, str]:
    """(CUDA usable, one line saying what torch sees)."""
    built = torch.version.cuda or "none (a CPU-only build)"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__}, CUDA build {built}, no CUDA device visible"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, f"torch {torch.__version__}, CUDA {built}, devices: {', '.join(names)}"


# --- GPU memory and utilisation, sampled with nvidia-smi (where it exists) ---------------------------------

class GpuSampler:
    """Peak memory.used (MiB) and utilization.gpu (%) of GPU 0 per named phase, from nvidia-smi every 0.25 s."""

    QUERY = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.phase, self.peaks, self.baseline = None, {}, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self):
        try:
            out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5).stdout.strip()
            mem, util = (float(x) for x in out.splitlines()[0].split(","))
            return mem, util
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _loop(self):
        while not self.stop.wait(0.25):
            got, phase = self._read(), self.phase
            if got and phase:
                mem, util = self.peaks.get(phase, (0.0, 0.0))
                self.peaks[phase] = (max(mem, got[0]), max(util, got[1]))

    def start(self):
        if self.available:
            got = self._read()
            self.baseline = got[0] if got else None
            self.thread.start()
        return self

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def line(self, phase: str) -> str:
        if not self.available:
            return "nvidia-smi not found: not sampled"
        mem, util = self.peaks.get(phase, (None, None))
        if mem is None:
            return "no sample"
        base = f" (idle {self.baseline:.0f} MiB before anything started)" if self.baseline is not None else ""
        return f"peak {mem:.0f} MiB used on GPU 0{base}, peak utilisation {util:.0f}%"


# --- the measurements --------------------------------------------------------------------------------------

def study_toml(args, num_gpus: float = 0.0) -> str:
    """A one-run study: a small GPT-2 byte-level LM on stdlib prose (the `gpt2_text` family), Adam;
    ``num_gpus``: the device pool's `[spectra] num_gpus` (the CPU reference pool asks for none)."""
    model = (f"{{ n_layer = {args.n_layer}, n_embd = {args.n_embd}, n_head = {args.n_head}, "
             f"seq_len = {args.seq_len}, n_train = {max(4 * args.examples, 128)}, n_test = 32 }}")
    return f"""[study]
name = "gpu_check"
seed = 0

[ray]
num_cpus = {args.cpus}

[spectra]
top_k = {args.top_k}
dtype = "float64"
workers = 1
examples = {args.examples}
microbatch = {args.examples}
num_gpus = {num_gpus:g}

[[runs]]
name = "gpt2"
family = "gpt2_text"
model = {model}
optimizer = "adam"
lr = 3e-3
batch_size = 32
steps = {args.steps}
checkpoint_steps = [{args.steps - 1}, {args.steps}]
train_workers = 1
"""


def saved_devices(path: Path) -> set[str]:
    """The devices the tensors in a torch.save file were saved from (readable on any machine)."""
    import torch

    seen: set[str] = set()

    def keep(storage, location):
        seen.add(location)
        return storage

    torch.load(path, map_location=keep, weights_only=True)
    return seen


def top_pairs(pool, state, study):
    """Lanczos on ``pool`` at ``state`` with the arguments `spectra.spectrum_rows` uses (the spectra
    stage's tol is its dtype's: a float32 pool gets float32's, as a float32 study would)."""
    import torch

    from eqlab.analyses.curvature.defaults import TABLE
    from eqlab.analyses.curvature.lanczos import lanczos

    sp = study.spectra
    tol = sp.tol if pool.dtype == sp.dtype else TABLE[pool.dtype].tol
    dim = pool.load(state)
    t0 = time.perf_counter()
    res = lanczos(pool.matvec, dim, k=sp.top_k, which="LA", tol=tol, max_iter=sp.max_iter, seed=study.seed,
                  dtype=torch.float64)
    return res, time.perf_counter() - t0, dim


def rayleigh_shift(dev_pool, cpu_pool, vectors):
    """For each unit vector v: (v·(H_dev − H_cpu)v, ‖(H_dev − H_cpu)v‖), one product on each pool."""
    out = []
    for v in vectors.T:
        e = dev_pool.matvec(v) - cpu_pool.matvec(v)
        out.append((abs(float(v @ e)), float(e.norm())))
    return out


def compare(dev, ref, shifts) -> list[dict]:
    """Per eigenvalue: the CPU value, the device value, the relative difference, the allowance, the verdict."""
    lam = ref.eigenvalues.tolist()
    rows = []
    for i, (c, d) in enumerate(zip(lam, dev.eigenvalues.tolist())):
        others = [abs(c - x) for j, x in enumerate(lam) if j != i]
        gap = min(others) if others else float("inf")
        shift, norm = shifts[i]
        allowed = dev.errors[i] + ref.errors[i] + shift + (norm * norm / gap if gap > 0 else float("inf"))
        rows.append({"rank": i, "cpu64": c, "device": d, "rel_diff": abs(d - c) / abs(c),
                     "allowed_rel": allowed / abs(c), "holds": abs(d - c) <= allowed,
                     "converged": bool(dev.converged[i] and ref.converged[i])})
    return rows


def verdict(rows: list[dict]) -> str:
    return "holds" if all(r["holds"] for r in rows) else "violated"


def run_check(args, on_cuda: bool, cuda_line: str) -> tuple[int, str]:
    import ray
    import torch

    from eqlab.pipeline import checkpoint as ckpt
    from eqlab.pipeline.cluster import connect
    from eqlab.pipeline.spectra import FamilySource, ShardedHessian
    from eqlab.pipeline.study import load_study
    from eqlab.pipeline.train import train_run

    t_start = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t_start:6.1f}s]"  # noqa: E731
    log = lambda msg: print(f"{stamp()} {msg}", flush=True)  # noqa: E731
    device = "cuda" if on_cuda else "cpu"
    sampler = GpuSampler().start() if on_cuda else None
    phase = lambda name: setattr(sampler, "phase", name) if sampler else None  # noqa: E731
    timings, lines = {}, []
    work = Path(tempfile.mkdtemp(prefix="eqgpu"))
    try:
        study_file = work / "gpu_check.toml"
        study_file.write_text(study_toml(args, 1 if on_cuda else 0))
        study = load_study(study_file)
        spec = study.runs[0]

        phase("ray start")
        t = time.perf_counter()
        resources = connect(num_cpus=args.cpus)
        timings["ray start"] = time.perf_counter() - t
        log(f"Ray up in {timings['ray start']:.1f}s: {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")
        if on_cuda and resources.get("GPU", 0) < 1:
            raise SystemExit("gpu_check: torch sees CUDA but Ray detected no GPU; nothing to check")

        phase("training")
        t = time.perf_counter()
        result = train_run(spec, work / "results", cpus_per_worker=max(1, args.cpus // 2), log=log,
                           gpus_per_worker=1.0 if on_cuda else 0.0)
        timings["training (train_run)"] = time.perf_counter() - t
        last = max(result.checkpoints)
        trained_on = sorted(saved_devices(result.checkpoints[last] / ckpt.OPTIMIZER))
        metrics = ckpt.load_metrics(result.checkpoints[last])
        log(f"trained {spec.steps} steps in {timings['training (train_run)']:.1f}s; Adam state saved from "
            f"{trained_on}; train loss {metrics['train_loss']:.4f}")
        prev = max(s for s in result.checkpoints if s < last)  # one optimizer step before the last
        state, state_prev = (ckpt.load_state(result.checkpoints[s]) for s in (last, prev))

        sp = study.spectra
        source = FamilySource(spec.family, spec.model, spec.seed, sp.examples, sp.microbatch)
        half = max(1, args.cpus // 2)
        phase("cpu float64")
        t = time.perf_counter()
        cpu_pool = ShardedHessian(source, 1, "float64", cpus_per_worker=half)
        ref, ref_s, dim = top_pairs(cpu_pool, state, study)
        timings["cpu float64: pool start + Lanczos"] = time.perf_counter() - t
        log(f"CPU float64: top-{sp.top_k} {[f'{x:.6g}' for x in ref.eigenvalues.tolist()]} in {ref.n_matvec} HVPs, "
            f"{ref_s:.1f}s ({ref_s / ref.n_matvec * 1e3:.0f} ms/HVP), dim {dim}")

        results = {}
        for dtype in ("float64", "float32"):
            name = f"{device} {dtype}"
            phase(name)
            t = time.perf_counter()
            pool = ShardedHessian(source, 1, dtype, cpus_per_worker=half, num_gpus=sp.num_gpus)
            dev, dev_s, _ = top_pairs(pool, state, study)
            wall = time.perf_counter() - t
            shifts = rayleigh_shift(pool, cpu_pool, ref.eigenvectors)  # pool and cpu_pool hold `state`
            rows = compare(dev, ref, shifts)
            where = pool.where()[0]
            if where["device"].split(":")[0] != device:
                raise SystemExit(f"gpu_check: the {name} actor computed on {where['device']}, not {device}")
            results[name] = {"rows": rows, "hvps": dev.n_matvec, "lanczos_s": dev_s, "wall_s": wall, "where": where}
            log(f"{name}: on {where['device']} ({where.get('name', 'CPU')}), {dev.n_matvec} HVPs, {dev_s:.1f}s "
                f"({dev_s / dev.n_matvec * 1e3:.1f} ms/HVP); max rel diff {max(r['rel_diff'] for r in rows):.2e}, "
                f"allowed {min(r['allowed_rel'] for r in rows):.2e}..{max(r['allowed_rel'] for r in rows):.2e}: "
                f"{verdict(rows)}")
            if dtype == "float64":  # negative control on the same device pool: one step earlier
                control, _, _ = top_pairs(pool, state_prev, study)
                crow = compare(control, ref, shifts)  # the same allowance as the prediction above
                # the expected difference: the first-order shift v·(H_prev − H_last)v on the CPU pool,
                # good to ‖(H_prev − H_last)v‖²/gap (second order) plus both runs' error bounds
                cpu_pool.load(state_prev)
                at_prev = [cpu_pool.matvec(v) for v in ref.eigenvectors.T]
                cpu_pool.load(state)
                for r, v, hp in zip(crow, ref.eigenvectors.T, at_prev):
                    e = hp - cpu_pool.matvec(v)
                    others = [abs(r["cpu64"] - x["cpu64"]) for x in crow if x is not r]
                    lam, shift = r["cpu64"], float(v @ e)
                    slack = (control.errors[r["rank"]] + ref.errors[r["rank"]] + r["allowed_rel"] * abs(lam)
                             + float(e.norm()) ** 2 / min(others, default=float("inf")))
                    r["measured_rel"], r["expected_rel"] = (r["device"] - lam) / abs(lam), shift / abs(lam)
                    r["as_expected"] = abs(r["device"] - lam - shift) <= slack
                    r["slack_rel"] = slack / abs(lam)
                results["control"] = {"rows": crow}
                measured = ", ".join(f"{r['measured_rel']:+.2e}" for r in crow)
                expected = ", ".join(f"{r['expected_rel']:+.2e}" for r in crow)
                log(f"control (step {prev} on {device} vs step {last} on CPU): rel diffs [{measured}], expected "
                    f"[{expected}] (first order): {verdict(crow)} (must be violated)")
            pool.shutdown()
        cpu_pool.shutdown()
        timings["total"] = time.perf_counter() - t_start
    finally:
        if sampler:
            sampler.close()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(work, ignore_errors=True)

    control_verdict = verdict(results["control"]["rows"])
    as_expected = all(r["as_expected"] for r in results["control"]["rows"])
    ok = all(verdict(r["rows"]) == "holds" for k, r in results.items() if k != "control")
    # a control that fails, but not by the one-step change it should, is not the discrimination we claim
    status = ("holds" if ok else "violated") if control_verdict == "violated" and as_expected else "inconclusive"

    lines += [f"# GPU check ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
              f"`{' '.join(['python -m bench.gpu_check', *sys.argv[1:]])}`", "",
              f"- machine: {platform.node()}, {os.cpu_count()} CPUs; {cuda_line}; ray {ray.__version__}; "
              f"Ray cluster {args.cpus} logical CPUs",
              f"- model: `gpt2_text` {json.dumps(spec.model)}, {dim:,} parameters; Adam 3e-3, batch 32, "
              f"{spec.steps} steps, 1 Ray Train worker; Hessian batch {sp.examples} windows of {args.seq_len} bytes",
              f"- training: Ray Train `gpus_per_worker={1.0 if on_cuda else 0.0:g}`; "
              f"the checkpoint's Adam state was saved from **{', '.join(trained_on)}**"
              + (f"; GPU during training: {sampler.line('training')}" if sampler else ""),
              f"- verdict: **{status}** (prediction: device spectrum = CPU float64 spectrum within the allowance; "
              f"negative control {control_verdict}, by the expected amount: {as_expected})", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    for name, r in results.items():
        if name == "control":
            continue
        w = r["where"]
        lines += ["", f"## {name}: actor on `{w['device']}`" + (f" ({w['name']}, peak {w['peak_mib']:.0f} MiB "
                  "allocated)" if "name" in w else "") + f", CUDA_VISIBLE_DEVICES={w['CUDA_VISIBLE_DEVICES']!r}, "
                  f"Ray resources {w['resources']}",
                  "", f"{r['hvps']} HVPs in {r['lanczos_s']:.2f} s ({r['lanczos_s'] / r['hvps'] * 1e3:.1f} ms/HVP; "
                  f"CPU float64: {ref.n_matvec} HVPs, {ref_s / ref.n_matvec * 1e3:.1f} ms/HVP); pool start + "
                  f"Lanczos {r['wall_s']:.1f} s" + (f"; GPU: {sampler.line(name)}" if sampler else ""), "",
                  "| rank | CPU float64 | device | rel. diff | allowed (rel.) | converged | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['rank']} | {x['cpu64']:.10g} | {x['device']:.10g} | {x['rel_diff']:.2e} | "
                  f"{x['allowed_rel']:.2e} | {x['converged']} | {'holds' if x['holds'] else 'violated'} |"
                  for x in r["rows"]]
    lines += ["", f"## Negative control: step {prev} on the device (float64) against step {last} on the CPU",
              "", f"The float64 allowance above; **{control_verdict}** (must be violated). Expected: "
              "v_i·H(step %d) v_i − λ_i on the CPU pool (first order in the one-step change)." % prev, "",
              "| rank | rel. diff measured | expected (first order) | allowed (rel.) | verdict | "
              "expected ± (2nd order + errors, rel.) | as expected |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['rank']} | {x['measured_rel']:+.3e} | {x['expected_rel']:+.3e} | {x['allowed_rel']:.2e} | "
              f"{'holds' if x['holds'] else 'violated'} | {x['slack_rel']:.2e} | {x['as_expected']} |"
              for x in results["control"]["rows"]]
    lines.append("")
    report = "\n".join(lines)
    print("\n" + report)
    out = args.out if args.out is not None else (DEFAULT_OUT if on_cuda else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"written to {out}")
    return (0 if status == "holds" else 1), report


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    on_cuda, line = cuda_report(torch)
    if not on_cuda and not args.allow_cpu:
        print(f"gpu_check: no CUDA here ({line}); nothing was started. Run it on a machine with an NVIDIA GPU, "
              "or pass --allow-cpu to run the same path with the 'GPU' actor on the CPU.", file=sys.stderr)
        return NO_CUDA_EXIT
    if not on_cuda:
        print(f"gpu_check: no CUDA ({line}); --allow-cpu: the device actor runs on the CPU", flush=True)
    from eqlab.pipeline.env import apply_defaults

    apply_defaults()  # loopback, offline, no usage stats: before Ray is imported
    return run_check(args, on_cuda, line)[0]


if __name__ == "__main__":
    sys.exit(main())
