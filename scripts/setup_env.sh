#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies and this project into it. Sourced by
# quickstart.sh (the core) and by setup_real.sh, test.sh and CI (everything); safe to rerun (each part installs
# once for each version of its files).
#   RLHF_JAX_INSTALL=dev (default) | core
#     core: the library only (requirements-lock.txt): no torch, no transformers. What the quickstart needs.
#     dev:  also the parity extras (torch, then transformers & co.: requirements-parity.txt) and the test
#           extras (pytest, ruff, wandb, ...: requirements-test.txt), and SkyPilot's YAML parser
#           (requirements-cloud-test.txt, --no-deps). What the tests need.
#   RLHF_JAX_ACCEL=cpu (default) | cuda12 | tpu
#     jax's build: the lock's CPU jax, or with it "jax[cuda12]==<the lock's jax>" (NVIDIA GPUs; CUDA and
#     cuDNN come as pip packages) or "jax[tpu]==<the lock's jax>" (Cloud TPU VMs; libtpu).
#   RLHF_JAX_TORCH_INDEX=https://download.pytorch.org/whl/cpu
#     where dev takes torch from; set it where a plain `pip install torch` brings the CUDA build (PyPI's
#     Linux x86 wheels are CUDA builds). Unset, pip's own indexes (this project's machines hold a CPU build).
# e.g. RLHF_JAX_ACCEL=tpu bash scripts/quickstart.sh, or RLHF_JAX_ACCEL=cuda12 bash scripts/test.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
ACCEL="${RLHF_JAX_ACCEL:-cpu}"
INSTALL="${RLHF_JAX_INSTALL:-dev}"
case "$ACCEL" in
  cpu | cuda12 | tpu) ;;
  *) echo "error: RLHF_JAX_ACCEL=$ACCEL: use cpu, cuda12 or tpu." >&2 && exit 2 ;;
esac
case "$INSTALL" in
  core | dev) ;;
  *) echo "error: RLHF_JAX_INSTALL=$INSTALL: use core (the library) or dev (also the test and parity extras)." >&2 && exit 2 ;;
esac
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
stamp() {  # a file marking that part $1 is installed, for these versions of the files that pin it
  local name="$1"
  shift
  echo "$ROOT/.venv/.installed-$name-$(cat "$@" | sha1sum | cut -c1-12)"
}
# --no-compile: Python compiles a module to bytecode the first time it is imported (and keeps the .pyc), so
# the install does not compile all ~21,000 files of the environment up front (about a minute on 2 cores).
# That needs Python allowed to write the .pyc: with PYTHONDONTWRITEBYTECODE set (some machines and CI images
# set it), every process would compile every module it imports again: in a fresh .venv, 3.5 s of CPU instead
# of 1.4 s to import jax, flax, optax, orbax and tfds, 10.1 s instead of 4.5 s for torch and transformers, in
# each of the test suite's processes. Unset for the scripts that source this one.
unset PYTHONDONTWRITEBYTECODE
PIP=(python -m pip install --quiet --no-compile)
CORE_STAMP="$(stamp "core-$ACCEL" "$ROOT/requirements-lock.txt" "$ROOT/setup.py")"
if [ ! -f "$CORE_STAMP" ]; then
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" -r "$ROOT/requirements-lock.txt"
  if [ "$ACCEL" != cpu ]; then  # the accelerator's plugin (or libtpu) for the lock's jax version
    "${PIP[@]}" "jax[$ACCEL]==$(sed -n 's/^jax==//p' "$ROOT/requirements-lock.txt")"
  fi
  "${PIP[@]}" --no-deps -e "$ROOT"
  touch "$CORE_STAMP"
fi
DEV_STAMP="$(stamp dev "$ROOT/requirements-parity.txt" "$ROOT/requirements-test.txt" "$ROOT/requirements-cloud-test.txt")"
if [ "$INSTALL" = dev ] && [ ! -f "$DEV_STAMP" ]; then
  # torch first, on its own, so the CPU build is the one installed and nothing later pulls a CUDA wheel.
  "${PIP[@]}" torch==2.13.0 ${RLHF_JAX_TORCH_INDEX:+--index-url "$RLHF_JAX_TORCH_INDEX"}
  # transformers & co. for the HF parity tests (tests/test_hf.py; they skip, saying why, without them).
  "${PIP[@]}" -r "$ROOT/requirements-parity.txt"
  "${PIP[@]}" -r "$ROOT/requirements-test.txt"
  # SkyPilot's YAML parser for tests/test_sweep.py, without its click<8.2 pin (see the file)
  "${PIP[@]}" --no-deps -r "$ROOT/requirements-cloud-test.txt"
  touch "$DEV_STAMP"
fi
