"""Tests run on CPU with 8 fake devices, so sharding is exercised without accelerators.

Compiled programs are shared across tests and the processes they start through JAX's persistent
compilation cache, in one directory per test run (RLHF_JAX_TEST_CACHE to reuse one across runs):
many tests compile the same tiny step again (a resume test runs the same config three times).
`-m "not slow"` leaves out the end-to-end and multi-process tests (scripts/test.sh --fast).
"""

import os
import tempfile

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(flags: str, n: int) -> str:
    """`flags` (XLA_FLAGS) with the fake device count set to n, whatever else it holds."""
    kept = [f for f in flags.split() if not f.startswith(DEVICES_FLAG)]
    return " ".join(kept + [f"{DEVICES_FLAG}={n}"])


# Must be set before JAX initialises its backends. Any other XLA flag the machine sets is kept.
os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("RLHF_JAX_TEST_CACHE") or tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end or multi-process (left out by scripts/test.sh --fast)")
