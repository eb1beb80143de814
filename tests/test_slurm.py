"""A sweep on a real SLURM: a one-node cluster on localhost (Debian's slurm-wlm and munge, started here with
its own slurm.conf in a temporary directory) runs the array job `scripts/sweep.py --emit slurm` writes. One
task is requeued mid-run with `scontrol requeue`; another gets the USR1 that `--signal=B:USR1@<grace>` sends
before its time limit, saves and requeues itself. Every run must end bit for bit as the uninterrupted one
does, and `--collect` must summarise them. Skips, naming why, where SLURM is not installed or does not start
(.ci/run installs it where it can).

The USR1 is sent with `scancel --batch --signal=USR1`, exactly as slurmctld sends it at the time limit minus
the grace: SLURM's shortest limit (1 minute), checked every few tens of seconds, would make this test's length
depend on the machine's speed.
"""

import csv
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
STEPS = 200

SLURM_CONF = """\
ClusterName=rlhfjax
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={dir}/munge.socket,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid_file: str) -> None:
    try:
        with open(pid_file) as f:
            os.kill(int(f.read().strip()), 15)
    except (OSError, ValueError):
        pass


@pytest.fixture(scope="module")
def slurm():
    """{env var: value} that points SLURM's commands at a one-node cluster (munged, slurmctld, slurmd) on
    localhost, started here and stopped after the module."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not on PATH); .ci/run installs slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs, and this test runs as another user")
    d = tempfile.mkdtemp(prefix="rlhf_jax_slurm_")  # not under pytest's tmp_path: munged wants every directory
    os.chmod(d, 0o755)  # above its socket searchable by all
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub))
    key = os.path.join(d, "munge.key")
    with open(key, "wb") as f:
        f.write(secrets.token_bytes(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(host=host, dir=d, ctld_port=_free_port(), d_port=_free_port()))
    env = dict(os.environ, SLURM_CONF=conf)
    started = []
    try:
        for name, cmd in (
            (
                "munged",
                [
                    "munged",
                    f"--key-file={key}",
                    f"--socket={d}/munge.socket",
                    f"--pid-file={d}/munged.pid",
                    f"--log-file={d}/munged.log",
                    f"--seed-file={d}/munged.seed",
                ],
            ),
            ("slurmctld", ["slurmctld", "-i", "-f", conf]),
            ("slurmd", ["slurmd", "-f", conf]),
        ):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"{name} did not start (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
            started.append(os.path.join(d, f"{name}.pid"))
        deadline = time.time() + 30
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            log = open(os.path.join(d, "slurmctld.log")).read()[-1500:]
            pytest.skip(f"SLURM started but its node never became idle (sinfo: {state.strip()!r}):\n{log}")
        yield {"SLURM_CONF": conf}
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        time.sleep(1)
        for pid_file in reversed(started):
            _stop(pid_file)
        shutil.rmtree(d, ignore_errors=True)


def _squeue(env, job: str) -> dict[str, str]:
    """{array task id (e.g. 12_0): state} of `job`'s tasks still known to SLURM as queued or running."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], env=env, capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def _steps_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"train/loss"' in line for line in f)


def _comparable(workdir) -> list[tuple[int, str, float]]:
    """Every logged number but timings, in order."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            for k, v in record.items():
                if k != "step" and not k.startswith("perf/") and isinstance(v, (int, float)):
                    out.append((record["step"], k, v))
    return out


def _params_digest(workdir) -> str:
    spec = importlib.util.spec_from_file_location("kill_soak", os.path.join(ROOT, "scripts", "kill_soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.params_digest(str(workdir))


# Three runs that differ only in how many checkpoints they keep: the same training, so the uninterrupted
# one is the reference, bit for bit, of the two that are interrupted.
EXPERIMENT = f"""
BASE = "configs/pretrain.py:tiny"
FIXED = {{"num_steps": {STEPS}, "log_every": 1, "eval_every": {STEPS}, "checkpoint.every": 25,
          "data.builtin_chars": 20000}}
SWEEP = [{{"checkpoint.keep": k}} for k in (1, 2, 3)]
"""


@pytest.mark.slow
def test_slurm_array_survives_requeue_and_time_limit_and_collects(slurm, tmp_path):
    exp, root = tmp_path / "requeue.py", tmp_path / "sweep"
    exp.write_text(EXPERIMENT)
    emit = [sys.executable, "scripts/sweep.py", str(exp), "--root", str(root), "--emit", "slurm"]
    emit += ["--grace", "30", "--max-requeues", "2", "--sbatch=--time=10"]
    subprocess.run(emit, cwd=ROOT, check=True, capture_output=True, timeout=120)
    script = (root / "launch" / "sweep.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@30" in script

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_JAX_", "SLURM_"))}
    env.update(slurm, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = with_device_count(os.environ["XLA_FLAGS"], 1)
    job = subprocess.run(
        ["sbatch", "--parsable", str(root / "launch" / "sweep.sbatch")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    runs = ["keep=1", "keep=2", "keep=3"]  # array tasks 0, 1, 2
    logs = [root / "launch" / f"slurm-{job}_{i}.out" for i in range(3)]

    def timed_out(what):
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:] if p.exists() else ''}" for p in logs)
        pytest.fail(f"timed out waiting for {what}; squeue: {_squeue(env, job)}\n{tails}")

    # Task 0 is requeued by the operator mid-run (as SLURM's preemption requeues: SIGTERM to the run, then
    # requeue); task 1 gets the warning SLURM sends `grace` seconds before the time limit. The tasks run at once
    # and a run is mid-run for a few seconds only, so one loop watches both and acts on each without waiting.
    actions = {
        0: ["scontrol", "requeue", f"{job}_0"],
        1: ["scancel", "--batch", "--signal=USR1", f"{job}_1"],
    }
    sent = []
    deadline = time.time() + 150
    while actions:
        for i in [i for i in actions if 20 <= _steps_logged(root / runs[i]) < STEPS - 30]:
            sent.append(subprocess.Popen(actions.pop(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        if actions and time.time() > deadline:
            timed_out(f"task(s) {sorted(actions)} to be mid-run")
        time.sleep(0.05)
    for p in sent:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, (p.args, out)
    deadline = time.time() + 150
    while _squeue(env, job):
        if time.time() > deadline:
            timed_out("every task to finish")
        time.sleep(0.5)

    out = [p.read_text() for p in logs]
    assert "DUE TO JOB REQUEUE" in out[0] and "attempt 2" in out[0] and "resumed from" in out[0], out[0][-3000:]
    assert "time limit: saved; requeueing" in out[1] and "attempt 2" in out[1], out[1][-3000:]
    assert "resumed from" in out[1] and "attempt 2" not in out[2] and "resumed from" not in out[2], out[2][-3000:]
    reference = _comparable(root / runs[2])
    assert [s for s, k, _ in reference if k == "train/loss"] == list(range(1, STEPS + 1))
    for run in runs[:2]:
        assert _comparable(root / run) == reference, run  # no step lost or repeated; every value the same
        assert (root / run / "DONE.json").exists()
    assert len({_params_digest(root / run) for run in runs}) == 1

    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == runs and {r["status"] for r in rows} == {"finished"}
    last_loss = [v for s, k, v in reference if k == "train/loss"][-1]
    assert {float(r["train/loss"]) for r in rows} == {last_loss}
