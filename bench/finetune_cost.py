"""What spectra cost next to training, on the MiniLM fine-tune (issue 10's benchmark; not a timed test).

    python -m bench.finetune_cost [--layers 6] [--quick] [--out FILE]

One driver process on a local Ray (2 logical CPUs, no dashboard, 127.0.0.1 only: `pipeline.cluster.connect`,
the study's own start-up):

1. Training. The `minilm_cls` family (real pretrained all-MiniLM-L6-v2 weights) is fine-tuned in this
   process with what `pipeline.train.train_loop` does per optimizer step: the seeded minibatch
   (`minibatch_indices`), zero_grad, forward, loss, backward, the step's gradient norm, AdamW step, at 2
   torch threads (the whole machine, as the 2 Ray Train workers together). Every step is timed; the
   steps between consecutive checkpoints of the log-spaced schedule (`log_spaced_steps`) are summed.
   `evaluate` (what train_loop runs at every checkpoint: train/test forward and a full-train-set gradient)
   is timed once, at the analysed checkpoint. Not covered: DDP's gradient all-reduce between Ray Train
   workers, checkpoint writing, Ray Train's own start-up and report barriers.
2. Spectra. At one checkpoint (the last of the schedule), the top-k Lanczos of the spectra stage:
   `ShardedHessian(FamilySource(...))` + `spectrum_rows` with the stage's settings (`SpectraSpec`:
   float32 products, its float32 tol, top 5; the pool's CPUs and torch threads as the stage gives them
   when analysis has the run's 2 CPUs: 2 CPUs / 2 threads for 1 actor, 1 / 1 each for 2), with 1 and with
   2 actors. Wall time of the whole call: pool start-up (actor processes, each building the model and its
   micro-batches), load of the checkpoint's weights, Lanczos. Peak memory: summed PSS of this process and
   all its descendants (Ray's processes and the actors), sampled every 0.25 s, split by process kind.
3. c = (time of one HVP) / (time of one forward + backward) on the same Hessian batch, in this process
   (2 threads, the checkpoint's weights, `HessianOperator` with method ``auto`` and with uncached double
   backward): the constant the GPT-2 small cost model in analyses/curvature/COST.md uses.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILY = "minilm_cls"
THREADS = 2  # the machine's cores: the run's whole share on the 2-CPU local cluster


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] (load {load()}) {msg}", flush=True)


class Memory(threading.Thread):
    """Peak summed PSS (RSS where PSS cannot be read) of this process and its descendants, by kind."""

    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        self.period, self.halt = period, threading.Event()
        self.peak_total, self.at_peak, self.peak_by_kind = 0, {}, {}
        self.me = psutil.Process()

    @staticmethod
    def kind(p: psutil.Process, me: int) -> str:
        if p.pid == me:
            return "driver"
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return "ray"
        return "actors" if title.startswith("ray::HessianShard") else "ray"

    def sample(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in [self.me] + self.me.children(recursive=True):
            try:
                m = p.memory_full_info()
                b = getattr(m, "pss", m.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            k = self.kind(p, self.me.pid)
            out[k] = out.get(k, 0) + b
        return out

    def run(self):
        while True:
            s = self.sample()
            total = sum(s.values())
            if total > self.peak_total:
                self.peak_total, self.at_peak = total, s
            for k, v in s.items():
                self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0), v)
            if self.halt.wait(self.period):
                return

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return {"peak_total": self.peak_total, "at_peak": self.at_peak, "peak_by_kind": self.peak_by_kind}


def gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


# ------------------------------------------------------------------------------------------------ training
def train(options: dict, steps: int, batch: int, lr: float, wd: float, checkpoints: tuple[int, ...], seed: int,
          eval_at: int):
    """Run the optimizer steps of train_loop in this process; returns (per-step seconds, state at eval_at,
    evaluate seconds at eval_at, final metrics)."""
    from eqlab.models import build_task
    from eqlab.pipeline.train import _grad_norm, evaluate, make_optimizer, minibatch_indices

    task = build_task(FAMILY, options, seed=seed)
    model = task.model
    opt = make_optimizer(SimpleNamespace(optimizer="adamw", lr=lr, weight_decay=wd, momentum=0.0), model.parameters())
    X, y = task.train
    times, state, eval_s, metrics = [], None, None, {}
    for step in range(steps + 1):
        if step == eval_at:
            t0 = time.perf_counter()
            metrics = evaluate(task, model)
            eval_s = time.perf_counter() - t0
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log(f"checkpoint {step}: evaluate {eval_s:.1f}s, train loss {metrics['train_loss']:.4f}, "
                f"test acc {metrics['test_acc']:.3f}")
        elif step in checkpoints:
            log(f"checkpoint {step} (steps so far {sum(times):.1f}s)")
        if step == steps:
            break
        t0 = time.perf_counter()
        idx = minibatch_indices(len(y), batch, seed, step)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(X[idx]), y[idx])
        float(loss.detach())  # train_loop reads it for the ranks' mean
        loss.backward()
        _grad_norm(model)  # train_loop records it every step (rank 0)
        opt.step()
        times.append(time.perf_counter() - t0)
    n_train = len(y)
    del task, model, opt
    gc.collect()
    return times, state, eval_s, metrics, n_train


# ------------------------------------------------------------------------------------------------- spectra
def spectra(source, state, workers: int, sp, max_iter: int) -> dict:
    from eqlab.pipeline.spectra import ShardedHessian, spectrum_rows

    base = Memory().sample()
    mem = Memory()
    mem.start()
    load0 = load()
    t0 = time.perf_counter()
    pool = ShardedHessian(source, workers, sp.dtype, cpus_per_worker=THREADS / workers,
                          threads=max(1, THREADS // workers))
    try:
        rows, tri = spectrum_rows(pool, state, sp.top_k, sp.tol, max_iter, seed=0)
        wall = time.perf_counter() - t0
    finally:
        pool.shutdown()
    m = mem.stop()
    r0 = rows[0]
    out = {"workers": workers, "wall_s": wall, "lanczos_s": r0["seconds"], "startup_load_s": wall - r0["seconds"],
           "hvps": r0["hvps"], "iterations": r0["iterations"], "n_examples": r0["n_examples"],
           "eigenvalues": [r["eigenvalue"] for r in rows], "residuals": [r["residual"] for r in rows],
           "converged": [r["converged"] for r in rows], "hvp_method": r0["hvp_method"],
           "baseline": base, "memory": m, "load_before": load0, "load_after": load()}
    log(f"{workers} actor(s): {wall:.1f}s whole call ({out['startup_load_s']:.1f}s start-up + load), {out['hvps']} HVPs, "
        f"{sum(out['converged'])}/{len(rows)} converged, peak {gb(m['peak_total'])} GB "
        f"(driver {gb(m['at_peak'].get('driver', 0))}, actors {gb(m['at_peak'].get('actors', 0))}); "
        f"top-{len(rows)} {[round(x, 4) for x in out['eigenvalues']]}")
    time.sleep(3)  # the killed actors' processes exit before the next baseline
    return out


# ---------------------------------------------------------------------------------------- c = HVP / fwd+bwd
def hvp_ratio(options: dict, state: dict, source, seed: int, repeats: int) -> dict:
    from eqlab.analyses.curvature.operator import HessianOperator
    from eqlab.models import build_task

    torch.set_num_threads(THREADS)
    task = build_task(FAMILY, options, seed=seed)
    task.model.load_state_dict(state)
    task.model.train()
    _, loss_fn, batches = source(torch.float32)
    params = [p for p in task.model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def fwd_bwd():
        for X, y in batches:
            torch.autograd.grad(loss_fn(task.model(X), y), params)

    def timed(fn, k):
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g)
    res = {"dim": n, "batches": [len(b[1]) for b in batches]}
    fwd_bwd()  # warm-up (allocator, first-call costs)
    res["fwd_bwd_s"] = timed(fwd_bwd, repeats)
    t0 = time.perf_counter()
    op = HessianOperator(task.model, loss_fn, batches, method="auto", dtype=torch.float32)
    op.matvec(v)  # builds the remaining graphs
    res["auto_setup_and_first_s"] = time.perf_counter() - t0
    res["auto_method"], res["auto_reason"] = op.method, op.method_reason
    res["cache_bytes"] = op.cache_bytes if op.method == "double_backward_cached" else 0
    res["auto_hvp_s"] = timed(lambda: op.matvec(v), repeats)
    del op
    gc.collect()
    op = HessianOperator(task.model, loss_fn, batches, method="double_backward", dtype=torch.float32)
    op.matvec(v)
    res["double_backward_hvp_s"] = timed(lambda: op.matvec(v), max(2, repeats - 1))
    res["fwd_bwd_s_after"] = timed(fwd_bwd, repeats)  # drift check: the same fwd+bwd after the products
    del op
    fb = statistics.median(res["fwd_bwd_s"] + res["fwd_bwd_s_after"])
    res["c_auto"] = statistics.median(res["auto_hvp_s"]) / fb
    res["c_double_backward"] = statistics.median(res["double_backward_hvp_s"]) / fb
    log(f"c: fwd+bwd {fb:.2f}s, HVP {res['auto_method']} {statistics.median(res['auto_hvp_s']):.2f}s "
        f"(c = {res['c_auto']:.2f}), double_backward {statistics.median(res['double_backward_hvp_s']):.2f}s "
        f"(c = {res['c_double_backward']:.2f})")
    return res


# ------------------------------------------------------------------- ratios robust to the machine's load
def interleaved_ratios(options: dict, examples: int, microbatch: int, batch: int, seed: int, rounds: int,
                       warm_steps: int = 3) -> dict:
    """Round-robin in one process: one training step (batch ``batch``), one forward+backward of the
    Hessian batch, one HVP on the cached graph, one uncached double-backward HVP, ``rounds`` times.
    A burst of outside load hits all four alike, so their ratios hold where absolute times do not."""
    from eqlab.analyses.curvature.operator import HessianOperator
    from eqlab.models import build_task
    from eqlab.pipeline.spectra import FamilySource
    from eqlab.pipeline.train import _grad_norm, make_optimizer, minibatch_indices

    from bench.metrics import interleaved

    torch.set_num_threads(THREADS)
    task = build_task(FAMILY, options, seed=seed)
    model = task.model
    opt = make_optimizer(SimpleNamespace(optimizer="adamw", lr=3e-5, weight_decay=0.01, momentum=0.0), model.parameters())
    X, y = task.train
    step = [0]

    def train_step():
        idx = minibatch_indices(len(y), batch, seed, step[0])
        step[0] += 1
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(X[idx]), y[idx])
        float(loss.detach())
        loss.backward()
        _grad_norm(model)
        opt.step()

    for _ in range(warm_steps):  # a few real steps first: the weights of a checkpoint, not step 0
        train_step()
    _, loss_fn, batches = FamilySource(FAMILY, options, seed, examples, microbatch)(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))

    def fwd_bwd():
        for Xb, yb in batches:
            torch.autograd.grad(loss_fn(model(Xb), yb), params)

    # operators on a snapshot of the weights (training steps in between do not touch them)
    cached = HessianOperator(model, loss_fn, batches, method="auto", dtype=torch.float32)
    plain = HessianOperator(model, loss_fn, batches, method="double_backward", dtype=torch.float32)
    lb = load()
    t = interleaved({"train_step": train_step, "fwd_bwd": fwd_bwd, "hvp_auto": lambda: cached.matvec(v),
                     "hvp_double_backward": lambda: plain.matvec(v)}, rounds, warmup=1)
    res = {"rounds": rounds, "times": t, "auto_method": cached.method, "cache_bytes": cached.cache_bytes,
           "load_before": lb, "load_after": load(), "batches": [len(b[1]) for b in batches], "batch": batch}
    for k in ("hvp_auto", "hvp_double_backward", "train_step"):
        r = [a / b for a, b in zip(t[k], t["fwd_bwd"])]  # per round: the same seconds of the same load
        res[f"{k}_over_fwd_bwd"] = {"median": statistics.median(r), "min_ratio_of_mins": min(t[k]) / min(t["fwd_bwd"])}
    r = [a / b for a, b in zip(t["hvp_auto"], t["train_step"])]
    res["hvp_auto_over_train_step"] = {"median": statistics.median(r), "min_ratio_of_mins": min(t["hvp_auto"]) / min(t["train_step"])}
    log("interleaved: " + ", ".join(f"{k} med {med(x):.2f}s min {min(x):.2f}s" for k, x in t.items()))
    return res


def ratios_section(r: dict, argv: list[str]) -> str:
    t = r["times"]
    L = ["", "## Interleaved ratios (load-robust; run after the above)", "",
         f"`{' '.join(argv)}`: {r['rounds']} rounds, each one training step (batch {r['batch']}), one forward+backward "
         f"of the Hessian batch ({r['batches']}), one HVP with `auto` (→ `{r['auto_method']}`, cached graph "
         f"{r['cache_bytes'] / 1e9:.2f} GB) and one uncached `double_backward` HVP, round-robin in one process at 2 threads "
         f"(`bench.metrics.interleaved`). Load {r['load_before']} → {r['load_after']}.", "",
         "| | median s | min s | ÷ fwd+bwd of the Hessian batch (median of per-round ratios) | ratio of minima |",
         "|---|---|---|---|---|"]
    L.append(f"| forward + backward, Hessian batch | {med(t['fwd_bwd']):.2f} | {min(t['fwd_bwd']):.2f} | 1 | 1 |")
    for k, name in (("hvp_auto", f"HVP `auto` (`{r['auto_method']}`)"), ("hvp_double_backward", "HVP `double_backward`"),
                    ("train_step", f"training step (batch {r['batch']}, AdamW)")):
        q = r[f"{k}_over_fwd_bwd"]
        L.append(f"| {name} | {med(t[k]):.2f} | {min(t[k]):.2f} | **{q['median']:.2f}** | {q['min_ratio_of_mins']:.2f} |")
    q = r["hvp_auto_over_train_step"]
    L.append("")
    L.append(f"HVP (`auto`) ÷ training step: {q['median']:.2f} (median of per-round ratios), {q['min_ratio_of_mins']:.2f} (ratio of minima).")
    L.append("")
    L.append("```json")
    L.append(json.dumps(r, default=str))
    L.append("```")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------- report
def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def write(out: Path, cfg: dict, tr: dict, sp_res: list[dict], c: dict | None, argv: list[str]) -> None:
    ckpts = cfg["checkpoints"]
    step_s = tr["step_s"]
    intervals = [(a, b, sum(step_s[a:b])) for a, b in zip(ckpts, ckpts[1:])]
    mean_interval = sum(step_s) / (len(ckpts) - 1)
    per_step = med(step_s)
    L = []
    L.append(f"# Spectra vs training on the MiniLM fine-tune — {cfg['started']}")
    L.append("")
    L.append(f"`{' '.join(argv)}` (`bench/finetune_cost.py`; {'QUICK mode' if cfg['quick'] else 'full mode'}).")
    L.append("")
    L.append(f"- Machine: {cfg['machine']}; shared with other engineers' jobs, load average "
             f"(1/5/15 min) at start {cfg['load_start']}, at end {cfg['load_end']} (per phase below). "
             "Absolute times are contended; each phase's load is beside it.")
    L.append(f"- Model: `{FAMILY}` {json.dumps(cfg['options'])}: all-MiniLM-L6-v2's real pretrained weights, "
             f"{cfg['layers']} of its 6 layers, new 4-class head; n = {tr['dim']:,} trainable parameters "
             f"(embeddings and pooler included). Data: {tr['n_train']} training docstrings "
             f"(4 classes × {cfg['options']['per_class']}, 3:1 split), {cfg['options']['seq_len']} tokens each.")
    L.append(f"- Training schedule: AdamW lr {cfg['lr']}, weight decay {cfg['wd']}, batch {cfg['batch']}, "
             f"{cfg['steps']} steps ({cfg['steps'] * cfg['batch'] / tr['n_train']:.1f} epochs), "
             f"{len(ckpts)} log-spaced checkpoints {list(ckpts)} (`log_spaced_steps`).")
    L.append(f"- Spectra settings (the stage's `SpectraSpec(dtype='float32')`): top {cfg['top_k']}, float32 products, "
             f"tol {cfg['tol']:g}·max|θ| (√eps of float32), float64 Lanczos basis on the driver (`spectrum_rows`), "
             f"max_iter {cfg['max_iter']} ({cfg['max_iter_why']}); Hessian batch: the first {cfg['examples']} "
             f"training examples as micro-batches of {cfg['microbatch']} ({cfg['examples'] // cfg['microbatch']} "
             "micro-batches, so 2 actors get one each; {cfg['examples'] / cfg['batch']:g}× the training minibatch; "
             "pipeline/studies/zoo.toml uses 64 / 32).")
    L.append("")
    L.append("## Training steps between checkpoints (in-process, 2 torch threads)")
    L.append("")
    L.append(f"Load average during training: {tr['load_before']} → {tr['load_after']}. Per optimizer step "
             f"(forward, backward, gradient norm, AdamW step on batch {cfg['batch']}): median {per_step:.2f} s, "
             f"min {min(step_s):.2f} s, max {max(step_s):.2f} s over {len(step_s)} steps; all {len(step_s)} steps "
             f"{sum(step_s):.1f} s.")
    L.append("")
    L.append("| interval | steps | seconds |")
    L.append("|---|---|---|")
    for a, b, s in intervals:
        L.append(f"| {a} → {b} | {b - a} | {s:.1f} |")
    L.append(f"| mean interval | {cfg['steps'] / (len(ckpts) - 1):.1f} | {mean_interval:.1f} |")
    L.append("")
    L.append(f"`evaluate` at checkpoint {cfg['eval_at']} (train_loop runs it at every checkpoint: forward over "
             f"train and test sets, one full-train-set gradient): {tr['eval_s']:.1f} s. Train loss there "
             f"{tr['metrics'].get('train_loss', float('nan')):.4f}, test accuracy {tr['metrics'].get('test_acc', float('nan')):.3f}.")
    L.append("")
    L.append("Covers the optimizer steps' compute at the full minibatch on the whole machine (2 threads: the "
             "same flops as 2 Ray Train workers × half the batch). Does **not** cover DDP's gradient all-reduce "
             f"(gloo: {tr['dim'] * 4 / 1e6:.0f} MB of float32 gradients per step between 2 workers), checkpoint "
             "writing, Ray Train's start-up and report barriers, or the loss all-reduce per step.")
    L.append("")
    L.append(f"## Top-{cfg['top_k']} Lanczos at checkpoint {cfg['eval_at']} (whole call: pool start-up + load + Lanczos)")
    L.append("")
    L.append("| actors | CPUs × threads each | whole call (s) | start-up + load (s) | Lanczos (s) | HVPs | s per HVP step | "
             "converged | peak memory, summed PSS (GB) | of it: driver / actors / other Ray (GB) | above the idle tree (GB) | load before → after |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sp_res:
        m, w = r["memory"], r["workers"]
        ap = m["at_peak"]
        L.append(f"| {w} | {THREADS / w:g} × {max(1, THREADS // w)} | {r['wall_s']:.1f} | {r['startup_load_s']:.1f} | "
                 f"{r['lanczos_s']:.1f} | {r['hvps']} | {r['lanczos_s'] / r['hvps']:.2f} | {sum(r['converged'])}/{len(r['converged'])} | "
                 f"{gb(m['peak_total'])} | {gb(ap.get('driver', 0))} / {gb(ap.get('actors', 0))} / {gb(ap.get('ray', 0))} | "
                 f"{gb(m['peak_total'] - sum(r['baseline'].values()))} | {r['load_before']} → {r['load_after']} |")
    L.append("")
    for r in sp_res:
        L.append(f"- {r['workers']} actor(s): eigenvalues {', '.join(f'{x:.6g}' for x in r['eigenvalues'])}; "
                 f"residuals {', '.join(f'{x:.2g}' for x in r['residuals'])}; {r['iterations']} iterations; "
                 f"n_examples {r['n_examples']}; HVP method `{r['hvp_method']}`; peak per kind "
                 f"(each kind's own maximum): {', '.join(f'{k} {gb(v)} GB' for k, v in sorted(r['memory']['peak_by_kind'].items()))}.")
    if len(sp_res) == 2:
        a, b = sp_res
        L.append(f"- Eigenvalues, 1 vs 2 actors: max relative difference "
                 f"{max(abs(x - y) / abs(x) for x, y in zip(a['eigenvalues'], b['eigenvalues'])):.1e} "
                 "(the same operator: micro-batch j on actor j mod W, summed in float64).")
    L.append("")
    L.append("## Ratio spectra / training")
    L.append("")
    L.append("| actors | spectra per checkpoint (s) | ÷ mean interval's steps | ÷ longest interval's steps | ÷ (mean interval + evaluate) | "
             f"whole run: {len(ckpts)} spectra ÷ {cfg['steps']} steps |")
    L.append("|---|---|---|---|---|---|")
    longest = max(s for _, _, s in intervals)
    for r in sp_res:
        w = r["wall_s"]
        L.append(f"| {r['workers']} | {w:.1f} | {w / mean_interval:.2f} | {w / longest:.2f} | "
                 f"{w / (mean_interval + tr['eval_s']):.2f} | {len(ckpts) * w / sum(step_s):.2f} |")
    L.append("")
    L.append(f"Per HVP step of Lanczos against one training step: {sp_res[0]['lanczos_s'] / sp_res[0]['hvps'] / per_step:.1f}× "
             f"(1 actor; Hessian batch {cfg['examples']} vs training batch {cfg['batch']}).")
    if c:
        L.append("")
        L.append("## c = HVP time / forward+backward time on the same Hessian batch (in-process, 2 threads)")
        L.append("")
        L.append(f"Batch: {c['batches']} examples per micro-batch at the checkpoint's weights, float32. "
                 f"Load {c['load_before']} → {c['load_after']}.")
        L.append("")
        L.append("| | seconds (each repeat) | median | c |")
        L.append("|---|---|---|---|")
        fb = med(c["fwd_bwd_s"] + c["fwd_bwd_s_after"])
        L.append(f"| forward + backward (before / after the products) | {', '.join(f'{x:.2f}' for x in c['fwd_bwd_s'])} / "
                 f"{', '.join(f'{x:.2f}' for x in c['fwd_bwd_s_after'])} | {fb:.2f} | 1 |")
        L.append(f"| HVP, `auto` → `{c['auto_method']}` | {', '.join(f'{x:.2f}' for x in c['auto_hvp_s'])} | "
                 f"{med(c['auto_hvp_s']):.2f} | **{c['c_auto']:.2f}** |")
        L.append(f"| HVP, `double_backward` (no cache) | {', '.join(f'{x:.2f}' for x in c['double_backward_hvp_s'])} | "
                 f"{med(c['double_backward_hvp_s']):.2f} | **{c['c_double_backward']:.2f}** |")
        L.append("")
        L.append(f"`auto` chose `{c['auto_method']}` ({c['auto_reason']}); cached graph {c['cache_bytes'] / 1e9:.2f} GB "
                 f"for {sum(c['batches'])} examples; operator construction + first product {c['auto_setup_and_first_s']:.1f} s.")
    L.append("")
    L.append("## Raw")
    L.append("")
    L.append("```json")
    L.append(json.dumps({"config": cfg, "training": {k: v for k, v in tr.items() if k != "metrics"}, "spectra": sp_res,
                         "c": c}, default=str))
    L.append("```")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    log(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="a short schedule and a small Hessian batch (a smoke run)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--examples", type=int)
    ap.add_argument("--microbatch", type=int)
    ap.add_argument("--max-iter", type=int, default=40)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--wait-memory", type=float, default=900, help="seconds to wait for RAM before the spectra")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-c", action="store_true", help="skip the HVP / forward+backward measurement")
    ap.add_argument("--out")
    ap.add_argument("--ratios-only", type=int, metavar="ROUNDS",
                    help="only the interleaved ratios (training step, fwd+bwd, HVPs), appended to --out")
    a = ap.parse_args(argv)
    steps = a.steps or (20 if a.quick else 100)
    examples = a.examples or (16 if a.quick else 64)
    microbatch = a.microbatch or (8 if a.quick else 32)
    per_class = 24 if a.quick and a.per_class == 100 else a.per_class
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / ("finetune_cost_quick.md" if a.quick else "finetune_cost.md")

    if a.ratios_only:
        torch.set_num_threads(THREADS)
        opts = {"layers": a.layers, "classes": 4, "seq_len": 32, "per_class": per_class}
        r = interleaved_ratios(opts, examples, microbatch, a.batch, 0, a.ratios_only)
        with open(out, "a") as f:
            f.write(ratios_section(r, ["python", "-m", "bench.finetune_cost", *(argv if argv is not None else sys.argv[1:])]))
        log(f"appended to {out}")
        return 0

    from eqlab.pipeline.cluster import connect
    from eqlab.pipeline.spectra import FamilySource
    from eqlab.pipeline.study import SpectraSpec, log_spaced_steps

    torch.set_num_threads(THREADS)
    options = {"layers": a.layers, "classes": 4, "seq_len": 32, "per_class": per_class}
    seed, lr, wd = 0, 3e-5, 0.01
    ckpts = log_spaced_steps(steps, a.checkpoints)
    sp = SpectraSpec(dtype="float32", examples=examples, microbatch=microbatch, workers=2)
    cfg = {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": a.quick,
           "machine": f"{platform.node()}, {psutil.cpu_count()} cores, "
                      f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}",
           "load_start": load(), "options": options, "layers": a.layers, "lr": lr, "wd": wd, "batch": a.batch,
           "steps": steps, "checkpoints": ckpts, "eval_at": ckpts[-1], "top_k": sp.top_k, "tol": sp.tol,
           "examples": examples, "microbatch": microbatch}
    log(f"training {steps} steps, checkpoints {list(ckpts)}")
    lb = load()
    step_s, state, eval_s, metrics, n_train = train(options, steps, a.batch, lr, wd, ckpts, seed, ckpts[-1])
    from eqlab.models import build_task
    dim = sum(p.numel() for p in build_task(FAMILY, options, seed=seed).model.parameters() if p.requires_grad)
    tr = {"step_s": step_s, "eval_s": eval_s, "metrics": metrics, "n_train": n_train, "dim": dim,
          "load_before": lb, "load_after": load()}
    gc.collect()

    # max_iter: a study's default is 300, but the driver's float64 basis costs 2·n·8 B per step (Q and HQ)
    per_step = 2 * dim * 8
    need, deadline = a.max_iter * per_step + 8e9, time.time() + a.wait_memory
    while psutil.virtual_memory().available < need and time.time() < deadline:  # others' jobs share the RAM
        log(f"waiting for {gb(need)} GB available (have {gb(psutil.virtual_memory().available)} GB)")
        time.sleep(20)
    avail = psutil.virtual_memory().available
    fit = int((avail - 8e9) // per_step)  # room for the driver's O(n) temporaries, the actors, others
    max_iter = min(a.max_iter, max(sp.top_k + 1, fit))
    cfg["max_iter"] = max_iter
    cfg["max_iter_why"] = (f"cap: the float64 basis is 2·n·8 B = {per_step / 1e6:.0f} MB per step, {gb(max_iter * per_step)} GB "
                           f"at the cap; MemAvailable was {gb(avail)} GB; the study default 300 would be {gb(300 * per_step)} GB")
    log(f"max_iter {max_iter} ({cfg['max_iter_why']})")

    connect(num_cpus=2)  # ray.init(address="local", num_cpus=2, include_dashboard=False, 127.0.0.1)
    import ray
    try:
        source = FamilySource(FAMILY, options, seed, examples, microbatch)
        sp_res = []
        for w in [int(x) for x in a.workers.split(",")]:
            sp_res.append(spectra(source, state, w, sp, max_iter))
    finally:
        ray.shutdown()
    c = None
    if not a.no_c:
        lb = load()
        c = hvp_ratio(options, state, FamilySource(FAMILY, options, seed, examples, microbatch), seed, a.repeats)
        c["load_before"], c["load_after"] = lb, load()
    cfg["load_end"] = load()
    write(out, cfg, tr, sp_res, c, ["python", "-m", "bench.finetune_cost", *(argv if argv is not None else sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
