"""Checkpoints: SIGTERM saves and exits cleanly, rerun resumes; a corrupt checkpoint is named, not trusted."""

import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import lm
from tests.test_lm_stage import ROOT, pretrain_cfg, tiny
from tests.conftest import with_device_count


def _cmd(workdir, steps):
    return [sys.executable, "-m", "rlhf_jax.main", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            f"--config.num_steps={steps}", "--config.checkpoint.every=100000", "--config.log_every=1",
            "--config.eval_every=100000", "--config.progress=False"]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_the_same_command_resumes(tmp_path):
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 2))
    proc = subprocess.Popen(_cmd(tmp_path, 3000), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 20 <= steps[0] < 3000
    stopped = steps[0]

    # Rerun the same command (shorter horizon so the test is quick): it resumes after `stopped`.
    r = subprocess.run(_cmd(tmp_path, stopped + 5), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    logged = [m["step"] for m in read_metrics(str(tmp_path)) if "train/loss" in m]
    assert logged == list(range(1, stopped + 6))  # no step lost, none repeated


def test_corrupt_latest_checkpoint_is_a_clear_error(tmp_path):
    c = tiny(pretrain_cfg, num_steps=10, **{"checkpoint.every": 5})
    lm.train_and_evaluate(c, str(tmp_path))
    params_dir = tmp_path / "checkpoints" / "10" / "params"
    for root, _, files in os.walk(params_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    c = tiny(pretrain_cfg, num_steps=15, **{"checkpoint.every": 5})
    with pytest.raises(RuntimeError, match=r"checkpoints/10 could not be restored.*Delete that directory"):
        lm.train_and_evaluate(c, str(tmp_path))


def test_init_from_without_checkpoint_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model": {}}')
    c = tiny(pretrain_cfg, init_from=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        lm.train_and_evaluate(c, str(tmp_path / "run"))
