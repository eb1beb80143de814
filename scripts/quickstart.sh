#!/usr/bin/env bash
# Sets up .venv and runs the main job on the built-in task, offline:
# tokenizer → pretrain → SFT. Rerunning resumes; finished stages are skipped.
#   bash scripts/quickstart.sh [WORKDIR]        (default runs/quickstart)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORKDIR="${1:-runs/quickstart}"
python -m rlhf_jax.main --config=configs/pretrain.py --workdir="$WORKDIR/pretrain"
python -m rlhf_jax.main --config=configs/sft.py --workdir="$WORKDIR/sft" --config.init_from="$WORKDIR/pretrain"
echo "Done. Metrics: $WORKDIR/*/metrics.jsonl  (TensorBoard: tensorboard --logdir $WORKDIR)"
