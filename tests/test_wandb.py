"""Weights & Biases beside metrics.jsonl (config.log.wandb): the same scalars at the same steps and the config,
checked in offline mode by reading back the run files wandb writes; one W&B run per workdir across a resume; and
wandb, not a dependency of the library, is never imported unless asked for."""

import glob
import json
import os
import struct
import sys
import types

import pytest

from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import WANDB_ID_FILE, MetricWriter, read_metrics
from rlhf_jax.stages import lm
from tests.helpers import by_step, pretrain_cfg, tiny


def _records(path: str) -> list:
    """The protobuf records of an offline run's run-<id>.wandb: a LevelDB-style log (a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, pos, chunk, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _offline_runs(wandb_dir) -> list[dict]:
    """Each offline run under WANDB_DIR, oldest first: its id, name, config and history as {step: {key: value}}."""
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        run = {"history": {}, "config": {}}
        for r in _records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name)
                run["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                run["history"].setdefault(row["_step"], {}).update(row)
        runs.append(run)
    return runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(tmp_path / "wandb_dir")
    return str(tmp_path / "wandb_dir")


def test_a_run_logs_its_metrics_and_config_to_wandb_and_a_resume_continues_the_same_wandb_run(tmp_path, offline):
    pytest.importorskip("wandb", reason="the test extras install it: pip install -e .[test]")
    flags = {"optim.total_steps": 10, "checkpoint.every": 5, "log.wandb": True, "log.wandb_tags": ("smoke",)}
    workdir = str(tmp_path / "pt_tiny")
    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=5, **flags), workdir)
    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=10, **flags), workdir)  # resumes at step 5

    first, second = _offline_runs(offline)
    with open(os.path.join(workdir, WANDB_ID_FILE)) as f:
        assert first["id"] == second["id"] == f.read()
    assert first["name"] == "pt_tiny"
    assert first["config"]["stage"] == "pretrain" and first["config"]["log"]["wandb_project"] == "rlhf_jax"
    logged = by_step(read_metrics(workdir))
    history = {**first["history"], **second["history"]}
    assert sorted(history) == sorted(logged) == [5, 10]
    for step, record in logged.items():
        for key, value in record.items():
            if key != "step":
                assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)
    assert "eval/loss" in history[10] and "perf/tokens_per_sec" in history[5]


def test_a_run_without_the_key_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=5), str(tmp_path / "run"))
    assert read_metrics(str(tmp_path / "run"))[-1]["step"] == 5
    assert not os.path.exists(tmp_path / "run" / WANDB_ID_FILE)


def test_asking_for_wandb_without_it_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"config.log.wandb=True needs the wandb package.*pip install wandb"):
        lm.train_and_evaluate(tiny(pretrain_cfg, **{"log.wandb": True}), str(tmp_path / "run"))


def test_a_resumed_workdir_goes_on_in_its_wandb_run_without_the_steps_it_already_has(tmp_path, monkeypatch):
    # What an online W&B run that logged up to step 25 says on resume: the next step it takes is 26.
    calls = []
    run = types.SimpleNamespace(id="abc123", starting_step=26, finish=lambda: calls.append("finish"))
    run.log = lambda scalars, step: calls.append((step, scalars))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / WANDB_ID_FILE).write_text("abc123")
    c = tiny(pretrain_cfg, **{"log.wandb": True, "log.wandb_project": "mine", "log.wandb_entity": "lab"})

    writer = MetricWriter(str(tmp_path), resume_step=20, tensorboard=False, config=c)
    writer.write(25, {"train/loss": 2.0})  # replayed from the checkpoint at step 20
    writer.write(30, {"train/loss": 1.5, "eval/loss": float("nan")})
    writer.close()
    init, *logged = calls
    assert (init["id"], init["resume"], init["project"], init["entity"]) == ("abc123", "allow", "mine", "lab")
    assert init["name"] == tmp_path.name and init["config"]["log"]["wandb"] is True
    assert logged == [(30, {"train/loss": 1.5}), "finish"]  # the non-finite value is a string in metrics.jsonl
