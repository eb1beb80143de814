"""XLA_FLAGS editing. Imports nothing from JAX, so it can run before JAX reads its environment."""

from __future__ import annotations

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(flags: str, n: int | str | None) -> str:
    """`flags` (an XLA_FLAGS value) with the fake CPU device count set to n (None: the machine's own
    devices), every other flag kept."""
    kept = [f for f in flags.split() if not f.startswith(DEVICES_FLAG)]
    return " ".join(kept + ([f"{DEVICES_FLAG}={n}"] if n is not None else []))
