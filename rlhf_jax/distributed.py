"""Multi-process start-up: `jax.distributed.initialize` from the environment.

TPU pods and SLURM are detected by JAX itself; an explicit coordinator is
given with RLHF_JAX_COORDINATOR / RLHF_JAX_NUM_PROCESSES / RLHF_JAX_PROCESS_ID.
A single process needs nothing.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
    coordinator = os.environ.get("RLHF_JAX_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["RLHF_JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["RLHF_JAX_PROCESS_ID"]))
    elif "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
