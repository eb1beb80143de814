"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Which process group to join, in order:

  RLHF_JAX_DISTRIBUTED=0            none (a single process, even inside a multi-task SLURM job)
  RLHF_JAX_COORDINATOR=host:port    explicit: also RLHF_JAX_NUM_PROCESSES and RLHF_JAX_PROCESS_ID
  RLHF_JAX_DISTRIBUTED=1            JAX's own cluster detection (Cloud TPU pods, SLURM, Kubernetes, MPI)
  SLURM_NTASKS > 1, or a GKE TPU slice (TPU_WORKER_HOSTNAMES with several hosts)
                                    JAX's own cluster detection
  otherwise                         none

Two processes on one machine, for instance:

    RLHF_JAX_COORDINATOR=127.0.0.1:12345 RLHF_JAX_NUM_PROCESSES=2 RLHF_JAX_PROCESS_ID=0 \
        python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/mp &
    RLHF_JAX_COORDINATOR=127.0.0.1:12345 RLHF_JAX_NUM_PROCESSES=2 RLHF_JAX_PROCESS_ID=1 \
        python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/mp

Call `initialize()` before anything touches a JAX backend (jax.devices(), any array op).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

ENV_SWITCH = "RLHF_JAX_DISTRIBUTED"
ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"


def explicit_settings(env: Mapping[str, str]) -> dict | None:
    """jax.distributed.initialize kwargs from RLHF_JAX_COORDINATOR & co, or None when it is unset."""
    coordinator = env.get(ENV_COORDINATOR, "")
    if not coordinator:
        return None
    missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k, "").strip()]
    if missing:
        raise ValueError(
            f"{ENV_COORDINATOR}={coordinator!r} is set but {', '.join(missing)} is not. Set all "
            f"three, e.g. {ENV_NUM_PROCESSES}=2 {ENV_PROCESS_ID}=0 (then 1 on the second process)."
        )
    if ":" not in coordinator:
        raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port, e.g. 10.0.0.1:12345.")
    try:
        num, pid = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
    except ValueError:
        raise ValueError(
            f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
            f"{env[ENV_PROCESS_ID]!r} must be integers."
        ) from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num}).")
    return dict(coordinator_address=coordinator, num_processes=num, process_id=pid)


def plan(env: Mapping[str, str]) -> dict | None:
    """What `initialize` will do: None (single process), or the kwargs for jax.distributed.initialize
    ({} means JAX detects the cluster itself)."""
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch not in ("", "0", "1"):
        raise ValueError(
            f"{ENV_SWITCH}={env[ENV_SWITCH]!r}: use 1 (join the cluster JAX detects), 0 (stay a "
            f"single process) or leave it unset (decide from the environment)."
        )
    if switch == "0":
        return None
    settings = explicit_settings(env)
    if settings is not None:
        return settings
    slurm = int(env.get("SLURM_NTASKS", "") or 1) > 1
    gke_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    return {} if switch == "1" or slurm or gke_tpu else None


def initialize() -> None:
    """Joins the process group the environment describes (see the module docstring); else does nothing."""
    settings = plan(os.environ)
    if settings is None:
        return
    # CPU devices of different processes exchange collectives over gloo (TCP); without it a cross-process
    # psum on CPU fails at run time. Accelerator collectives (NCCL, ICI) are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process): e.g. after process 0 wrote a shared file."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
