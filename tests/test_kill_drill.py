"""The multi-host kill drill: one of two processes (2 × 4 CPU devices) of a policy-gradient run is SIGKILLed, or
sent SIGTERM alone, at 3 seeded points and both are relaunched; the result must equal an uninterrupted run's bit
for bit. The uninterrupted two-process run is also the one that must log what a single 8-device process logs.
Its own file, so that pytest-xdist runs it beside tests/test_multiprocess.py rather than after it."""

import importlib.util
import os
import random
import re
import signal
import time

import pytest

from rlhf_jax.metrics import read_metrics
from rlhf_jax.run import PREEMPTED_EXIT
from tests.helpers import resumed_from
from tests.test_multiprocess import (
    ROOT,
    TIMEOUT_S,
    MESH_2x2x2,
    _assert_same_metrics,
    _comparable,
    _launch,
    _run,
    _start,
)

# Six policy-gradient iterations, an (asynchronous) checkpoint after each: a kill loses at most the iteration under
# way, and the relaunch must redo it exactly (same rollouts, same updates) from the restored state and data position.
# float32: the KL is a small difference of log-probs, so the ~1e-7 that the all-reduce order (gloo across processes
# vs in-process) leaves in the params can flip a bf16 rounding and show at ~1e-3 against the one-process run.
PG_DRILL = (
    "configs/ppo.py:tiny",
    (
        "--config.num_steps=6",
        "--config.log_every=1",
        "--config.checkpoint.every=1",
        "--config.checkpoint.keep=2",
        "--config.rollout.max_new_tokens=6",
        "--config.pg.epochs=1",
        "--config.sample_every=3",
        "--config.model.dtype=float32",
        "--config.rollout.length_bucket=0",  # one prompt width: no launch compiles a second set of programs
        *MESH_2x2x2,
    ),
)


def _kill_soak():
    spec = importlib.util.spec_from_file_location("kill_soak", os.path.join(ROOT, "scripts", "kill_soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _logged_steps(workdir) -> int:
    """The last step in metrics.jsonl (0 before the first), read while process 0 may be writing it."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((int(m[1]) for m in re.finditer(r'^\{"step": (\d+)', f.read(), re.M)), default=0)


def _args(workdir) -> list[str]:
    config, overrides = PG_DRILL
    return [f"--config={config}", f"--workdir={workdir}", *overrides]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The drill's run on two processes, never interrupted (its workdir)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _launch(_args(workdir), workdir, num_processes=2, devices=4)
    return workdir


@pytest.mark.slow
def test_ppo_on_two_processes_logs_what_one_process_logs(uninterrupted, tmp_path):
    # Six iterations: the later ones see a policy that moved, so KL, kl_coef and the update all get compared.
    config, overrides = PG_DRILL
    _run(tmp_path / "one", config, overrides, num_processes=1, devices=8)
    _assert_same_metrics(uninterrupted, tmp_path / "one")
    last = read_metrics(str(uninterrupted))[-1]
    assert last["step"] == 6 and last["objective/kl"] != 0.0
    samples = [(d / "samples.jsonl").read_text() for d in (uninterrupted, tmp_path / "one")]
    assert samples[0] and samples[0] == samples[1]  # every process's episodes, decoded once by process 0


@pytest.mark.slow
def test_one_host_killed_or_preempted_at_three_points_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    """A multi-host job loses one host: at 3 seeded points of a 2-process policy-gradient run one process is
    SIGKILLed (no handler runs; the other is stopped as a cluster manager would) or, at one of them, sent SIGTERM
    alone, as when one host of a slice is preempted: then both must save the same step and exit 143 by themselves.
    Both are relaunched with the same command each time; the end result must equal, bit for bit, that of a run
    never interrupted."""
    rng = random.Random(0)
    killed = tmp_path / "killed"
    os.makedirs(killed)
    points = sorted(rng.sample(range(1, 6), 3))  # iterations logged before the kill
    signals = [signal.SIGKILL] * 3
    signals[rng.randrange(2)] = signal.SIGTERM  # not at the last point, which could land in the final iteration
    kills, resume = [], None  # resume: the newest complete checkpoint once the last kill landed
    for after, sig in zip(points, signals):
        procs, logs = _start(_args(killed), killed, num_processes=2, devices=4)
        try:
            deadline = time.time() + TIMEOUT_S
            while _logged_steps(killed) < after or (kills and "pg: compiled" not in open(logs[0]).read()):
                assert all(p.poll() is None for p in procs), open(logs[0]).read()[-4000:]
                assert time.time() < deadline, "timed out before the kill point"
                time.sleep(0.05)
            if kills:
                assert resumed_from(open(logs[0]).read()) == resume, kills
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next iteration or its checkpoint
            victim = rng.randrange(2)
            procs[victim].send_signal(sig)
            if sig == signal.SIGTERM:  # the other process learns of it at the end of the step and stops there too
                codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
                assert codes == [PREEMPTED_EXIT] * 2, (codes, open(logs[1 - victim]).read()[-4000:])
                saved = re.findall(r"SIGTERM: saved step (\d+);", open(logs[0]).read())
                assert len(saved) == 1 and int(saved[0]) >= after, open(logs[0]).read()[-4000:]
            procs[victim].wait()
            resume = max(_kill_soak().complete_steps(str(killed)), default=None)
            if sig == signal.SIGTERM:
                assert resume == int(saved[0]), kills
            kills.append({"after": after, "signal": sig.name, "process": victim, "resume from": resume})
        finally:
            for p in procs:  # the survivor of a SIGKILL would wait for its peer in a collective
                if p.poll() is None:
                    p.kill()
                p.wait()
    out = _launch(_args(killed), killed, num_processes=2, devices=4)[0]
    assert resumed_from(out) == resume, kills

    assert _comparable(killed) == _comparable(uninterrupted), kills  # every logged number, bit for bit
    assert [m["step"] for m in read_metrics(str(killed)) if "loss/policy_avg" in m] == [1, 2, 3, 4, 5, 6], kills
    soak = _kill_soak()
    assert soak.params_digest(str(killed)) == soak.params_digest(str(uninterrupted)), kills
