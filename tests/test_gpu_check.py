"""bench/gpu_check.py without a GPU: it refuses to start (exit 2, saying why) where no CUDA is visible,
rejects arguments it cannot run with, reads where a checkpoint's optimizer state was saved from (the
evidence of where training ran), and its allowance accepts a device spectrum inside the error terms and
rejects one outside them. The full path (`--allow-cpu`) starts Ray and trains, so it is not run here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not part of the installed package
from bench import gpu_check  # noqa: E402
EPS = sys.float_info.epsilon


def test_without_cuda_it_says_so_and_exits_2_before_starting_anything():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so this holds on a CUDA machine too
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == gpu_check.NO_CUDA_EXIT == 2, run.stdout + run.stderr
    assert "no CUDA" in run.stderr and "--allow-cpu" in run.stderr, run.stderr
    assert run.stdout == "", run.stdout  # nothing started: no Ray, no training line


@pytest.mark.parametrize("argv,complaint", [
    (["--n-embd", "30", "--n-head", "4"], "multiple of --n-head"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--cpus", "1"], "--cpus must be >= 2"),
    (["--steps", "many"], "invalid int value"),
])
def test_arguments_it_cannot_run_with_are_refused(capsys, argv, complaint):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and complaint in capsys.readouterr().err


def test_defaults_parse_and_the_study_has_the_control_checkpoint():
    args = gpu_check.parse_args([])
    assert not args.allow_cpu and args.out is None and args.n_embd % args.n_head == 0
    toml = gpu_check.study_toml(args)
    assert f"checkpoint_steps = [{args.steps - 1}, {args.steps}]" in toml and "train_workers = 1" in toml


@pytest.mark.parametrize("num_gpus", [0, 1])
def test_the_device_pool_asks_through_the_studys_own_num_gpus_setting(num_gpus):
    """The check's study file carries `[spectra] num_gpus` (1 on CUDA, 0 with --allow-cpu), parsed by the
    pipeline's own loader: the device pool is the pipeline's ShardedHessian with that setting, no subclass."""
    import tomllib

    from eqlab.pipeline.study import parse_study

    study = parse_study(tomllib.loads(gpu_check.study_toml(gpu_check.parse_args([]), num_gpus)))
    assert study.spectra.num_gpus == num_gpus and study.spectra.workers == 1
    assert not hasattr(gpu_check, "make_device_pool_classes")


def test_saved_devices_reads_where_the_state_was_saved_from(tmp_path, monkeypatch):
    """A CPU-saved Adam state says cpu; one saved from a GPU says cuda:0 even on a machine without one
    (the location tag is faked at save time, which is all torch.save records of the device)."""
    state = {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)}}, "param_groups": []}
    torch.save(state, tmp_path / "cpu.pt")
    assert gpu_check.saved_devices(tmp_path / "cpu.pt") == {"cpu"}
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, tmp_path / "gpu.pt")
    monkeypatch.undo()
    assert gpu_check.saved_devices(tmp_path / "gpu.pt") == {"cuda:0"}


def _result(values, errors):
    return SimpleNamespace(eigenvalues=torch.tensor(values, dtype=torch.float64), errors=list(errors),
                           converged=[True] * len(values))


def test_the_allowance_is_the_sum_of_the_error_terms_and_nothing_more():
    """allowed_i = err_dev + err_cpu + |v·Ev| + ‖Ev‖²/gap: a device value just inside it holds, one just
    outside (by 1 % of the allowance, far above the float64 rounding of these O(1) sums) is violated."""
    ref = _result([3.0, 2.0], [1e-9, 2e-9])
    shifts = [(3e-9, 1e-5), (4e-9, 1e-5)]  # (|v·Ev|, ‖Ev‖); gap = 1, so the second-order term is 1e-10
    allowed = [1e-9 + 1e-9 + 3e-9 + 1e-10, 2e-9 + 1e-9 + 4e-9 + 1e-10]
    inside = gpu_check.compare(_result([3.0 + 0.99 * allowed[0], 2.0 - 0.99 * allowed[1]], [1e-9, 1e-9]), ref, shifts)
    assert [r["holds"] for r in inside] == [True, True] and gpu_check.verdict(inside) == "holds"
    # four positive terms summed in another order, then divided: relative rounding below 8 eps
    assert [r["allowed_rel"] for r in inside] == pytest.approx([allowed[0] / 3, allowed[1] / 2], rel=8 * EPS)
    outside = gpu_check.compare(_result([3.0 + 1.01 * allowed[0], 2.0], [1e-9, 1e-9]), ref, shifts)
    assert [r["holds"] for r in outside] == [False, True] and gpu_check.verdict(outside) == "violated"
