#!/usr/bin/env bash
# Sets up .venv with pinned versions (the core, the parity and the test extras: setup_env.sh) and runs the test
# suite (CPU, 8 fake devices).
#   bash scripts/test.sh [--fast] [pytest args...]
# --fast lints first (ruff check, ruff format --check; settings in pyproject.toml), then leaves out the end-to-end
# and multi-process tests, those training to a learning outcome and those running whole stages more than once,
# e.g. resume-equals-uninterrupted (pytest -m "not slow"). .ci/run lints before the full suite.
# Test files run on RLHF_JAX_TEST_WORKERS pytest-xdist workers (default: the cores + 1, at most 4; 1 runs them in
# this process), a file at a time per worker, so a module's fixtures are built once; all share one compilation
# cache. The extra worker fills the time the others spend waiting on subprocesses, SLURM and checkpoint writes
# (2 cores: pytest 14:04 with 2 workers, 13:09 with 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_real.sh"  # setup_env.sh, plus gguf and SmolLM2 for tests/test_smollm2.py
echo "scripts/test.sh: .venv ready after ${SECONDS}s"
trap 'echo "scripts/test.sh: ${SECONDS}s in all"' EXIT
cd "$ROOT"
ARGS=()
if [ "${1:-}" = "--fast" ]; then
  shift
  ARGS=(-m "not slow")
  ruff check .
  ruff format --check .
fi
CORES="$(nproc)"
WORKERS="${RLHF_JAX_TEST_WORKERS:-$((CORES + 1 < 4 ? CORES + 1 : 4))}"
if [ "$WORKERS" != "1" ]; then
  # --no-loadscope-reorder: xdist would otherwise hand out the files with the most tests first, not
  # tests/conftest.py's order (the longest files first), and a long file of one test (the kill drill) last
  ARGS+=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
fi
python -m pytest -q -ra --durations=15 tests ${ARGS[@]+"${ARGS[@]}"} "$@"
