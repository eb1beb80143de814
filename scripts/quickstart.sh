#!/usr/bin/env bash
# Sets up .venv with the library alone (no torch, no transformers) and runs the main job on the built-in task,
# offline: data → tokenizer → pretrain → SFT → K samples → simulated labelers → RM → PPO → evaluation.
# Rerunning skips finished stages and resumes an interrupted one.
#   bash scripts/quickstart.sh [WORKDIR]        (default runs/quickstart)
#   RLHF_JAX_ACCEL=cuda12 bash scripts/quickstart.sh   (or tpu: jax's build for the accelerator; setup_env.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RLHF_JAX_INSTALL=core source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORKDIR="${1:-runs/quickstart}"
python -m rlhf_jax.pipeline --config=configs/pipeline.py --workdir="$WORKDIR"
echo "Report: $WORKDIR/report.md   Summary: $WORKDIR/summary.json   (TensorBoard: tensorboard --logdir $WORKDIR)"
