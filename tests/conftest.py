"""Tests run on CPU with 8 fake devices, so sharding is exercised without accelerators.

Compiled programs are shared across tests, the xdist workers and the processes tests start through
JAX's persistent compilation cache, in one directory per test run, removed at its end
(RLHF_JAX_TEST_CACHE names one to keep and reuse across runs): many tests compile the same tiny
step again (a resume test runs the same config three times). xdist workers inherit the directory
from the controlling process, which sets it here before they start.
`-m "not slow"` leaves out the end-to-end and multi-process tests, those that train until a learning
outcome shows, and those that run whole stages more than once (resume-equals-uninterrupted, a stage started
from another's workdir) (scripts/test.sh --fast); the full suite runs them all.
"""

import os
import shutil
import tempfile

from rlhf_jax.xla_flags import with_device_count  # imports no JAX; the tests' subprocesses use it too

# Must be set before JAX initialises its backends. Any other XLA flag the machine sets is kept.
os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
# The tests' programs are tiny: compiling them dominates their run time. Backend optimisation level 0
# skips LLVM's optimisation passes, and XLA:CPU's older elemental emitters compile fusions faster than its
# MLIR fusion emitters (a tiny PPO update: 3.1 s -> 1.7 s). LLVM's expensive passes off and the module compiled
# as one piece, not split for parallel codegen (whose threads only contend for the same 2 cores): a tiny
# pipeline's GRPO stage 24.2-25.2 s -> 19.2-21.7 s of CPU, test_pg_stage/test_smollm2/test_dpo_stage/test_model
# 233-234 s -> 210-214 s. The HLO is the same either way, so the numerics are the same up to instruction
# selection; a flag the machine sets itself is kept as it is.
COMPILE_SPEED_FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
    "--xla_llvm_disable_expensive_passes": "true",
    "--xla_cpu_parallel_codegen_split_count": "1",
}
for flag, value in COMPILE_SPEED_FLAGS.items():
    if flag not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += f" {flag}={value}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The parity tests' PyTorch side (and numpy's BLAS) on one thread: scripts/test.sh runs more xdist workers than
# cores, and OpenMP's waiting threads spin on cores the other workers need (tests/test_smollm2.py beside two busy
# processes on 2 cores: 62 s -> 43 s of CPU). The benchmarks set their own thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    if os.environ.get("RLHF_JAX_TEST_CACHE"):
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["RLHF_JAX_TEST_CACHE"]
    else:
        _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: end to end, multi-process, training to a learning outcome, or whole "
        "stages run more than once (left out by scripts/test.sh --fast)",
    )


# The longest files, longest first (pytest --durations=0, per-file sums of one run at 2 workers: 179 s down to
# 62 s). Only an ordering hint: a file missing here or out of date costs time, never a test.
LONGEST_FILES = (
    "test_pipeline.py",
    "test_policy_gradient_family.py",
    "test_multiprocess.py",
    "test_pg_stage.py",
    "test_lora.py",
    "test_kill_drill.py",
    "test_rm_ensemble.py",
    "test_smollm2.py",
    "test_smollm2_stages.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(session, config, items):
    """The longest files run first, then the other files holding slow tests, then the rest (each file keeps its
    own order). The xdist workers take a file at a time from the front of this order (scripts/test.sh passes
    --no-loadscope-reorder, without which xdist hands out the files with the most tests first), so the long
    files start early and the short ones fill in at the end, instead of one worker finishing a long file alone
    while the others sit idle."""
    heavy = {item.path for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    # a stable sort: the collection order otherwise
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path not in heavy))


def pytest_unconfigure(config):
    if _OWN_CACHE:  # only the process that made the directory (never an xdist worker, which inherited it)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
