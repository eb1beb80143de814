"""Checkpoints: SIGTERM saves and exits 143 (unfinished), rerun resumes; a corrupt checkpoint is named, not trusted."""

import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax.metrics import read_metrics
from rlhf_jax.run import PREEMPTED_EXIT
from rlhf_jax.stages import lm
from tests.conftest import with_device_count
from tests.helpers import ROOT, pretrain_cfg, tiny


def _cmd(workdir, steps):
    return [
        sys.executable,
        "-m",
        "rlhf_jax.main",
        "--config=configs/pretrain.py:tiny",
        f"--workdir={workdir}",
        f"--config.num_steps={steps}",
        "--config.checkpoint.every=100000",
        "--config.log_every=1",
        "--config.eval_every=100000",
        "--config.progress=False",
    ]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_same_command_resumes(tmp_path):
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 2))
    proc = subprocess.Popen(
        _cmd(tmp_path, 3000), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT == 143, out  # saved, not finished: launchers must not read it as done
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


def test_only_arrays_big_enough_are_split_among_their_replicas_and_all_restore_exactly(tmp_path, monkeypatch):
    # Replica-parallel saving slices each replicated shard on device (a compiled program per shape); a tiny
    # model's hundreds of small arrays are written whole by one replica instead, a big one is still split.
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from rlhf_jax import checkpoint

    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, P())
    big_rows = 8 * checkpoint.MIN_REPLICA_PARALLEL_SLICE_BYTES // (4 * 256)  # 1 MiB for each of 8 replicas
    params = {
        "big": jnp.arange(big_rows * 256, dtype=jnp.float32).reshape(big_rows, 256),
        **{f"small{i}": jnp.full((4, 8), float(i)) for i in range(5)},
    }
    params = jax.device_put(params, replicated)
    state = {"step": jax.device_put(jnp.int32(3), replicated)}
    sliced = []
    real_slice = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda x, *a, **k: sliced.append(x.shape) or real_slice(x, *a, **k))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, use_async=False)
    ckpt.save(3, params, state, {"stage": "test"})
    ckpt.wait()
    assert sliced and {s[0] for s in sliced} == {big_rows}  # only the big array's shards were sliced
    got, got_state, meta = ckpt.restore(3, params, state)
    ckpt.close()
    for k in params:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(params[k]))
    assert int(got_state["step"]) == 3 and meta["stage"] == "test"


def test_the_metric_writer_does_not_import_torch(tmp_path):
    # tensorboardX imports torch when it is installed, ~2 s of every run's start; we log floats only.
    code = (
        "import sys; from rlhf_jax.metrics import MetricWriter; w = MetricWriter(sys.argv[1]); "
        "w.write(1, {'loss': 0.5}); w.close(); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert os.listdir(tmp_path / "tensorboard")
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 0.5}]
