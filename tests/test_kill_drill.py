"""The multi-host kill drill: one of two processes (2 × 4 CPU devices) of a policy-gradient run is SIGKILLed at
2 seeded points and both are relaunched; the result must equal an uninterrupted run's bit for bit. Its own file,
so that pytest-xdist runs it beside tests/test_multiprocess.py rather than after it."""

import importlib.util
import os
import random
import re
import time

import pytest

from rlhf_jax.metrics import read_metrics
from tests.test_multiprocess import ROOT, TIMEOUT_S, MESH_2x2x2, _comparable, _launch, _run, _start

# Six policy-gradient iterations, an (asynchronous) checkpoint after each: a kill loses at most the iteration under
# way, and the relaunch must redo it exactly (same rollouts, same updates) from the restored state and data position.
PG_DRILL = (
    "configs/ppo.py:tiny",
    (
        "--config.num_steps=6",
        "--config.log_every=1",
        "--config.checkpoint.every=1",
        "--config.checkpoint.keep=2",
        "--config.rollout.max_new_tokens=6",
        "--config.pg.epochs=1",
        "--config.sample_every=100",
        "--config.model.dtype=float32",
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


def _resumed_from(log: str) -> int | None:
    """The checkpoint step a run's log says it resumed from; None for a fresh start."""
    found = re.search(r"resumed from \S+/checkpoints/(\d+)$", log, re.M)
    return int(found[1]) if found else None


@pytest.mark.slow
def test_sigkill_of_one_host_at_two_points_resumes_to_the_uninterrupted_result(tmp_path):
    """A multi-host job loses one host: at 2 seeded points of a 2-process policy-gradient run one process is
    SIGKILLed (no handler runs), the other is stopped as a cluster manager would, and both are relaunched with
    the same command. The end result must equal, bit for bit, that of a run never interrupted."""
    config, overrides = PG_DRILL
    args = lambda workdir: [f"--config={config}", f"--workdir={workdir}", *overrides]  # noqa: E731
    rng = random.Random(0)
    killed = tmp_path / "killed"
    os.makedirs(killed)
    kills, resume = [], None  # resume: the newest complete checkpoint once the last kill landed
    for after in sorted(rng.sample(range(1, 6), 2)):  # iterations logged before the kill
        procs, logs = _start(args(killed), killed, num_processes=2, devices=4)
        try:
            deadline = time.time() + TIMEOUT_S
            while _logged_steps(killed) < after or (kills and "pg: compiled" not in open(logs[0]).read()):
                assert all(p.poll() is None for p in procs), open(logs[0]).read()[-4000:]
                assert time.time() < deadline, "timed out before the kill point"
                time.sleep(0.05)
            if kills:
                assert _resumed_from(open(logs[0]).read()) == resume, kills
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next iteration or its checkpoint
            victim = rng.randrange(2)
            procs[victim].kill()
            procs[victim].wait()
            resume = max(_kill_soak().complete_steps(str(killed)), default=None)
            kills.append({"after": after, "killed process": victim, "resume from": resume})
        finally:
            for p in procs:  # the survivor would wait for its peer in a collective
                p.kill()
                p.wait()
    out = _launch(args(killed), killed, num_processes=2, devices=4)[0]
    assert _resumed_from(out) == resume, kills
    _run(tmp_path / "uninterrupted", config, overrides, num_processes=2, devices=4)

    assert _comparable(killed) == _comparable(tmp_path / "uninterrupted"), kills  # every logged number, bit for bit
    assert [m["step"] for m in read_metrics(str(killed)) if "loss/policy_avg" in m] == [1, 2, 3, 4, 5, 6], kills
    soak = _kill_soak()
    assert soak.params_digest(str(killed)) == soak.params_digest(str(tmp_path / "uninterrupted")), kills
