"""Bring your own model: `eqlab spectrum` and `eqlab inspect` on a FILE.py:FUNC, against dense truth."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from eqlab.analyses.curvature.dense import dense_hessian
from eqlab.analyses.curvature.operator import HessianOperator
from eqlab.pipeline.spectrum_cmd import compute_spectrum
from eqlab.pipeline.userfunc import UserSource

USER_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    def _make(act):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 3)).double()
        X = torch.randn(24, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (24,))
        return {"model": model, "batch": (X, y), "loss": nn.functional.cross_entropy}

    def relu_mlp():
        return _make(nn.ReLU)

    def gelu_mlp():
        return _make(nn.GELU)
''')


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "mymodels.py"
    path.write_text(USER_FILE)
    return path


def eqlab(*args):
    return subprocess.run([sys.executable, "-m", "eqlab.pipeline.cli", *args], capture_output=True, text=True, timeout=300)


def dense_spectrum(ref):
    model, loss, batches = UserSource(ref)(torch.float64)
    return np.linalg.eigvalsh(dense_hessian(HessianOperator(model, loss, batches)).numpy())


def test_spectrum_json_matches_dense_eigh(user_file):
    ref = f"{user_file}:relu_mlp"
    proc = eqlab("spectrum", ref, "--top", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    exact = dense_spectrum(ref)[::-1][:4]
    assert np.allclose(out["eigenvalues"], exact, rtol=1e-6, atol=0)
    assert len(out["residuals"]) == 4 and out["hvps"] > 0 and out["seconds"] > 0


def test_spectrum_sharded_bottom_and_block(user_file, ray_cluster):
    ref = f"{user_file}:relu_mlp"
    out = compute_spectrum(ref, top=2, bottom=2, workers=2)
    exact = dense_spectrum(ref)
    assert np.allclose(out["eigenvalues"], exact[::-1][:2], rtol=1e-6, atol=0)
    assert np.allclose(out["bottom_eigenvalues"], exact[:2], rtol=1e-6, atol=0)
    block = compute_spectrum(ref, top=1, block=r"^2\.")
    model, loss, batches = UserSource(ref)(torch.float64)
    sub = dense_hessian(HessianOperator(model, loss, batches, names=["2.weight", "2.bias"]))
    assert abs(block["eigenvalues"][0] - np.linalg.eigvalsh(sub.numpy())[-1]) <= 1e-6 * abs(block["eigenvalues"][0])


def test_spectrum_on_a_sharded_basis(user_file, ray_cluster):
    ref = f"{user_file}:relu_mlp"
    out = compute_spectrum(ref, top=3, workers=2, sharded_basis=True)
    assert out["method"] == "sharded-basis"
    assert np.allclose(out["eigenvalues"], dense_spectrum(ref)[::-1][:3], rtol=1e-6, atol=0)
    proc = eqlab("spectrum", ref, "--sharded-basis")  # needs --workers >= 2: a usage error, not a traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_spectrum_trace_and_density(user_file):
    ref = f"{user_file}:relu_mlp"
    out = compute_spectrum(ref, top=1, density=True, density_steps=60, probes=2, trace=True, trace_matvecs=198)
    exact = dense_spectrum(ref)
    # Hutch++ with 198 = 3 * dim products sketches all of this 66-dim operator: the estimate is exact.
    assert abs(out["trace"]["estimate"] - exact.sum()) <= 1e-6 * np.abs(exact).sum()
    assert abs(sum(out["density"]["weights"]) - 1) <= 1e-10
    assert min(out["density"]["nodes"]) >= exact[0] - 1e-8 and max(out["density"]["nodes"]) <= exact[-1] + 1e-8


def test_inspect_json_finds_and_verifies_relu_symmetries(user_file, tmp_path):
    proc = eqlab("inspect", f"{user_file}:relu_mlp", "--json", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_sym = {r["symmetry"]: r for r in rows}
    for key in ("name", "kind", "params", "generators", "first_order", "second_order", "holds"):
        assert all(key in r for r in rows)
    assert by_sym["relu_rescale"]["generators"] == 7 and by_sym["relu_rescale"]["holds"]
    assert by_sym["softmax_translation"]["generators"] == 7 + 1 and by_sym["softmax_translation"]["holds"]
    assert all(r["second_order"] <= 1e-8 for r in rows if r["holds"])
    assert list(tmp_path.glob("inspections/*/run.parquet"))


def test_inspect_gelu_has_no_rescale_symmetry(user_file, tmp_path):
    proc = eqlab("inspect", f"{user_file}:gelu_mlp", "--json", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    rescale = [r for r in rows if r["symmetry"] == "relu_rescale"]
    assert all(not r["holds"] and r["second_order"] >= 1e-2 for r in rescale)  # reported as broken, or absent
    assert any(r["symmetry"] == "softmax_translation" and r["holds"] for r in rows)


def test_spectrum_method_choice_and_its_misuse(user_file):
    ref = f"{user_file}:relu_mlp"
    proc = eqlab("spectrum", ref, "--top", "2", "--method", "double_backward", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "double_backward"
    assert np.allclose(out["eigenvalues"], dense_spectrum(ref)[::-1][:2], rtol=1e-6, atol=0)
    proc = eqlab("spectrum", ref, "--method", "compiled", "--workers", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("eqlab: error: --method") and "Traceback" not in proc.stderr


def test_bad_user_reference_is_one_line(tmp_path):
    proc = eqlab("inspect", f"{tmp_path}/missing.py:f")
    assert proc.returncode == 2 and proc.stderr.startswith("eqlab: error:") and "Traceback" not in proc.stderr


def test_transformers_folder_with_config_override(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=32).save_pretrained(tmp_path / "bert")
    proc = eqlab("inspect", str(tmp_path / "bert"), "--config", "num_hidden_layers=1", "--json",
                 "--results", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    params = {p for r in rows for p in r["params"]}
    assert any("layer.0." in p for p in params) and not any("layer.1." in p for p in params)
    qk = [r for r in rows if r["symmetry"] == "qk_gl"]
    assert qk and all(r["holds"] and r["generators"] == 2 * 4 * 4 for r in qk)  # 2 heads of d_head 4
    bad = eqlab("inspect", str(tmp_path / "bert"), "--config", "no_such_field=1")
    assert bad.returncode == 2 and "no such field" in bad.stderr and "Traceback" not in bad.stderr


TOKEN_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    V, D, B, T = 7, 6, 4, 8

    class Block(nn.Module):
        """LLaMA-style: tokens -> RMS-normed embedding -> linear head, logits (B, T, V)."""
        def __init__(self):
            super().__init__()
            self.emb, self.gain, self.head = nn.Embedding(V, D), nn.Parameter(torch.ones(D)), nn.Linear(D, V)

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(self.gain * h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())

    def make():
        torch.manual_seed(0)
        ids = torch.randint(0, V, (B, T))
        # the loss sees (B * T) logits: targets are flat, their first dimension is not the inputs'
        loss = lambda out, y: nn.functional.cross_entropy(out.reshape(-1, V), y)
        return {"model": Block().double(), "batch": (ids, torch.randint(0, V, (B * T,))), "loss": loss}
''')


def test_inspect_and_spectrum_use_a_token_level_batch_as_given(tmp_path, capsys):
    """Targets of (batch * tokens) beside inputs of (batch, tokens): nothing is cut by the first dimension."""
    from eqlab.pipeline.cli import main

    (tmp_path / "tok.py").write_text(TOKEN_FILE)
    ref = f"{tmp_path / 'tok.py'}:make"
    assert main(["inspect", ref, "--json", "--results", str(tmp_path / "r")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["symmetry"] == "softmax_translation" and r["holds"] for r in rows)
    assert main(["spectrum", ref, "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.allclose(out["eigenvalues"], dense_spectrum(ref)[::-1][:2], rtol=1e-6, atol=0)
