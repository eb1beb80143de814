"""Multi-process runs and topology changes, on CPU.

Two processes with 4 fake CPU devices each form one 8-device (data=2, fsdp=2, tensor=2) mesh,
joined by `jax.distributed` over loopback (gloo collectives). Each process loads only its half
of every batch; the run must log what a single 8-device process logs. A checkpoint they write
must restore in one process with 4 devices on a different mesh and continue identically.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rlhf_jax import distributed
from rlhf_jax.metrics import read_metrics
from tests.conftest import with_device_count
from tests.helpers import resumed_from, stopped_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_2x2x2 = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
TIMEOUT_S = 300  # per launch; a dead peer otherwise leaves the other blocked in a collective


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], devices), **extra)
    return env


def _start(args: list[str], log_dir, num_processes: int, devices: int) -> tuple[list[subprocess.Popen], list[str]]:
    """Starts `python -m rlhf_jax.main --config=... *args` as `num_processes` processes of one job: (procs, logs)."""
    cmd = [sys.executable, "-u", "-m", "rlhf_jax.main", *args, "--config.progress=False"]
    port = _free_port()
    logs = [os.path.join(log_dir, f"process{i}.log") for i in range(num_processes)]
    procs = []
    for i, log in enumerate(logs):
        extra = (
            dict(
                RLHF_JAX_COORDINATOR=f"127.0.0.1:{port}",
                RLHF_JAX_NUM_PROCESSES=str(num_processes),
                RLHF_JAX_PROCESS_ID=str(i),
            )
            if num_processes > 1
            else {}
        )
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, **extra), stdout=f, stderr=subprocess.STDOUT)
            )
    return procs, logs


def _launch(args: list[str], log_dir, num_processes: int, devices: int) -> list[str]:
    """Runs `python -m rlhf_jax.main --config=... *args` as `num_processes` processes of one job; returns their outputs.

    If one fails, the others are killed (they would wait for it in a collective) and its log is shown.
    """
    procs, logs = _start(args, log_dir, num_processes, devices)
    deadline = time.time() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                i = failed[0] if failed else 0
                pytest.fail(
                    f"process {i} of {num_processes} {'failed' if failed else 'timed out'}:\n"
                    + open(logs[i]).read()[-4000:]
                )
            time.sleep(0.2)
        for i, p in enumerate(procs):
            assert p.returncode == 0, open(logs[i]).read()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [open(log).read() for log in logs]


def _run(workdir, config: str, overrides, num_processes: int, devices: int) -> list[str]:
    os.makedirs(workdir, exist_ok=True)
    return _launch([f"--config={config}", f"--workdir={workdir}", *overrides], workdir, num_processes, devices)


def _comparable(workdir) -> dict[tuple[int, str], float]:
    """{(step, metric): value} for every logged number except timings, which differ run to run."""
    out = {}
    for record in read_metrics(str(workdir)):
        for k, v in record.items():
            if k != "step" and not k.startswith(("perf/", "time/")) and isinstance(v, (int, float)):
                out[(record["step"], k)] = float(v)
    return out


def _assert_same_metrics(got_dir, want_dir, rtol=1e-4, atol=1e-5):
    got, want = _comparable(got_dir), _comparable(want_dir)
    assert want and sorted(got) == sorted(want)
    bad = {k: (got[k], want[k]) for k in want if not np.isclose(got[k], want[k], rtol=rtol, atol=atol)}
    assert not bad, f"metrics differ (got, want): {bad}"


# float32: bf16 rounds each device's partial gradients, and how the batch is split over devices changes
# with the mesh (grad_norm then moves by ~1e-3); f32 leaves only the restore itself under test.
PRETRAIN = (
    "configs/pretrain.py:tiny",
    (
        "--config.num_steps=6",
        "--config.log_every=1",
        "--config.eval_every=6",
        "--config.checkpoint.every=3",
        "--config.checkpoint.keep=5",
        "--config.model.dtype=float32",
    ),
)


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """(two-process workdir, one-process workdir) of the same 6-step tiny pretrain on a 2x2x2 mesh."""
    base = tmp_path_factory.mktemp("pretrain")
    config, overrides = PRETRAIN
    outs = _run(base / "two", config, [*overrides, *MESH_2x2x2], num_processes=2, devices=4)
    _run(base / "one", config, [*overrides, *MESH_2x2x2], num_processes=1, devices=8)
    return base / "two", base / "one", outs


@pytest.mark.slow
def test_pretrain_on_two_processes_logs_what_one_process_logs(pretrain_runs):
    two, one, outs = pretrain_runs
    _assert_same_metrics(two, one)
    assert [m["step"] for m in read_metrics(str(two)) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    # Only process 0 reports; both ran the same 8-device mesh.
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in outs[0] and "pretrain:" not in outs[1]


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_four_devices_with_another_mesh(pretrain_runs, tmp_path):
    two, one, _ = pretrain_runs
    resumed = stopped_copy(two, tmp_path / "resumed", 3)  # as if the 8-device job had stopped after step 3
    config, overrides = PRETRAIN
    out = _run(
        resumed,
        config,
        [*overrides, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
        num_processes=1,
        devices=4,
    )[0]
    assert resumed_from(out) == 3 and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out
    # Steps 4-6 ran on the new topology from the restored params, optimiser state and data position,
    # and metrics.jsonl (steps 1-3 from the two processes) reads as one uninterrupted run.
    _assert_same_metrics(resumed, one)
    assert [m["step"] for m in read_metrics(str(resumed)) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_reward_model_on_two_processes_logs_what_one_process_logs(tmp_path):
    overrides = [
        "--config.num_steps=3",
        "--config.log_every=1",
        "--config.eval_every=3",
        "--config.eval_batches=2",
        "--config.checkpoint.every=3",
        *MESH_2x2x2,
    ]
    _run(tmp_path / "two", "configs/rm.py:tiny", overrides, num_processes=2, devices=4)
    _run(tmp_path / "one", "configs/rm.py:tiny", overrides, num_processes=1, devices=8)
    _assert_same_metrics(tmp_path / "two", tmp_path / "one")
    assert any("eval/rm/accuracy" in m for m in read_metrics(str(tmp_path / "two")))
    norm = [json.loads((tmp_path / d / "reward_norm.json").read_text()) for d in ("two", "one")]
    assert np.isclose(norm[0]["gain"], norm[1]["gain"], rtol=1e-4) and norm[0]["num_rewards"] == norm[1]["num_rewards"]


# PPO on two processes against one: tests/test_kill_drill.py, on the drill's uninterrupted run.


# --- the environment → process group mapping (no processes started) ------------------------------------


def test_plan_reads_the_environment():
    explicit = {"RLHF_JAX_COORDINATOR": "10.0.0.1:1234", "RLHF_JAX_NUM_PROCESSES": "4", "RLHF_JAX_PROCESS_ID": "3"}
    assert distributed.plan({}) is None
    assert distributed.plan({"SLURM_NTASKS": "1"}) is None
    assert distributed.plan(explicit) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert distributed.plan({"SLURM_NTASKS": "16"}) == {}
    assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
    assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert distributed.plan({"RLHF_JAX_DISTRIBUTED": "1"}) == {}  # e.g. a Cloud TPU pod found via metadata
    assert distributed.plan({"RLHF_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "16", **explicit}) is None


@pytest.mark.parametrize(
    "env,match",
    [
        ({"RLHF_JAX_COORDINATOR": "10.0.0.1:1234"}, "RLHF_JAX_NUM_PROCESSES, RLHF_JAX_PROCESS_ID is not"),
        ({"RLHF_JAX_COORDINATOR": "10.0.0.1", "RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": "0"}, "host:port"),
        ({"RLHF_JAX_COORDINATOR": "h:1", "RLHF_JAX_NUM_PROCESSES": "2", "RLHF_JAX_PROCESS_ID": "2"}, r"in \[0, "),
        ({"RLHF_JAX_COORDINATOR": "h:1", "RLHF_JAX_NUM_PROCESSES": "two", "RLHF_JAX_PROCESS_ID": "0"}, "integers"),
        ({"RLHF_JAX_DISTRIBUTED": "yes"}, "use 1"),
    ],
)
def test_plan_rejects_incomplete_settings_with_the_fix(env, match):
    with pytest.raises(ValueError, match=match):
        distributed.plan(env)
