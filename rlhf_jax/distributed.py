"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Which process group to join, in order:

  RLHF_JAX_DISTRIBUTED=0            none (a single process, even inside a multi-task SLURM job)
  RLHF_JAX_COORDINATOR=host:port    explicit: also RLHF_JAX_NUM_PROCESSES and RLHF_JAX_PROCESS_ID
  RLHF_JAX_DISTRIBUTED=1            JAX's own cluster detection (Cloud TPU pods, SLURM, Kubernetes, MPI)
  SLURM_NTASKS > 1, a GKE TPU slice of several hosts (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES
  with several entries), several TPU slices (MEGASCALE_NUM_SLICES > 1), or a Cloud TPU VM whose slice
  has several hosts (the GCE metadata server's worker-network-endpoints, as JAX's GceTpuCluster reads it)
                                    JAX's own cluster detection
  otherwise                         none

The metadata server is asked only on a Cloud TPU VM: where `import jax` found TPU chips and libtpu (JAX's
own test, no network) and TPU_SKIP_MDS_QUERY is unset. What JAX can detect but this list does not needs
RLHF_JAX_DISTRIBUTED=1: Open MPI or mpi4py launches, a Kubernetes job without the TPU variables, and on
Cloud TPU VMs several single-host slices (multislice, whose slice count is not in the environment there).

Two processes on one machine, for instance:

    RLHF_JAX_COORDINATOR=127.0.0.1:12345 RLHF_JAX_NUM_PROCESSES=2 RLHF_JAX_PROCESS_ID=0 \
        python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/mp &
    RLHF_JAX_COORDINATOR=127.0.0.1:12345 RLHF_JAX_NUM_PROCESSES=2 RLHF_JAX_PROCESS_ID=1 \
        python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/mp

Call `initialize()` before anything touches a JAX backend (jax.devices(), any array op).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping

import jax

from rlhf_jax.errors import ConfigError

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


def cloud_tpu_vm_hosts(env: Mapping[str, str]) -> int:
    """Hosts in this Cloud TPU VM's slice, from the GCE metadata server; 0 off a Cloud TPU VM, without asking."""
    from jax._src import cloud_tpu_init  # set by `import jax`: TPU chips on PCI and libtpu installed

    if not cloud_tpu_init.running_in_cloud_tpu_vm or "TPU_SKIP_MDS_QUERY" in env:
        return 0
    host = env.get("GCE_METADATA_IP", "metadata.google.internal")
    url = f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints"
    try:
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return len(response.read().decode().strip().split(","))
    except OSError as e:
        raise ConfigError(
            f"This is a Cloud TPU VM, but its metadata server did not list the slice's hosts ({url}: {e}). "
            f"Set {ENV_SWITCH}=1 on every host of a multi-host slice, or {ENV_SWITCH}=0 on a single host."
        ) from None


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
    if switch == "1" or int(env.get("SLURM_NTASKS", "") or 1) > 1 or int(env.get("MEGASCALE_NUM_SLICES", "") or 1) > 1:
        return {}
    gke_hosts = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
    if gke_hosts is not None:  # GKE sets these; its nodes' metadata would describe the node, not the slice
        return {} if "," in gke_hosts else None
    return {} if cloud_tpu_vm_hosts(env) > 1 else None


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
