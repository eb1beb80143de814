"""The memory planner (rlhf_jax/plan.py): from shapes alone it reports what a real run's memory.json
reports, FSDP shards what it should, the fits verdict follows the HBM given, PPO counts every model it
holds, a mesh that does not fit the devices fails clearly, and --devices sets the fake device count."""

import json
import os
import subprocess
import sys

import pytest

import configs.ppo as ppo_cfg
import configs.pretrain as pretrain_cfg
import configs.sft as sft_cfg
from rlhf_jax import plan
from rlhf_jax.stages import lm
from tests.helpers import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_planned_bytes_match_the_memory_json_of_a_real_run_on_the_same_mesh(tmp_path):
    mesh = {"mesh.data": 2, "mesh.fsdp": 4}
    c = tiny(pretrain_cfg, num_steps=1, log_every=1, eval_every=1000, **mesh)
    lm.train_and_evaluate(c, str(tmp_path))
    real = json.loads((tmp_path / "memory.json").read_text())
    run_model = json.loads((tmp_path / "config.json").read_text())["model"]  # vocab_size sized by its tokenizer

    planned = plan.plan(tiny(pretrain_cfg, num_steps=1, **mesh, **{f"model.{k}": v for k, v in run_model.items()}))
    assert planned["mesh"] == real["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert planned["params_bytes"] == pytest.approx(real["params_bytes_per_device"], rel=0.1)
    assert planned["opt_state_bytes"] == pytest.approx(real["opt_state_bytes_per_device"], rel=0.1)
    step = planned["functions"]["train step"]  # the same jitted step with the same shardings, compiled again
    for key in ("argument", "output", "temp", "alias"):
        assert step[key] == pytest.approx(real[f"step_{key}_bytes"], rel=0.1), key
    assert planned["total_bytes"] == pytest.approx(real["step_total_bytes"], rel=0.1)


def test_fsdp_over_more_devices_lowers_the_per_device_params_and_the_verdict_follows_hbm():
    shape = {"model.vocab_size": 512, "model.d_model": 64}
    replicated = plan.plan(tiny(sft_cfg, **shape, **{"mesh.data": 8, "mesh.fsdp": 1}))
    fsdp = plan.plan(tiny(sft_cfg, **shape, **{"mesh.data": 1, "mesh.fsdp": 8}), hbm_gib=1.0)
    assert fsdp["params_bytes"] < replicated["params_bytes"] / 4  # ~1/8: only tiny norms and biases stay whole
    assert fsdp["opt_state_bytes"] < replicated["opt_state_bytes"] / 4
    assert replicated["fits"] is None and fsdp["fits"] is True  # no HBM given: no verdict; 1 GiB: megabytes fit
    just_under = fsdp["total_bytes"] / plan.GIB * 0.99
    assert plan.plan(tiny(sft_cfg, **shape, **{"mesh.data": 1, "mesh.fsdp": 8}), hbm_gib=just_under)["fits"] is False


@pytest.mark.slow
def test_ppo_counts_policy_critic_their_optimizer_state_reference_and_rm():
    c = tiny(
        ppo_cfg,
        **{
            "model.vocab_size": 384,
            "reward.kind": "rm",
            "reward.rm_workdir": "unused",
            "pg.critic": "reward_model",
            "mesh.data": 2,
            "mesh.fsdp": 4,
        },
    )
    r = plan.plan(c)
    one_model = r["frozen_bytes"] / 2  # the reference policy and the RM: one model each, every head
    assert r["params_bytes"] == pytest.approx(2 * one_model, rel=0.01)  # the policy and the critic
    assert r["opt_state_bytes"] >= 2 * r["params_bytes"]  # Adam's two moments of both
    assert set(r["functions"]) == {"rollout", "score", "update"}
    resident = r["params_bytes"] + r["opt_state_bytes"] + r["frozen_bytes"]
    for name, f in r["functions"].items():
        assert f["peak"] >= resident + f["temp"], name  # every function's peak holds every model
    assert r["total_bytes"] == max(f["peak"] for f in r["functions"].values())


def test_a_mesh_that_does_not_fit_the_devices_fails_naming_the_fix():
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        plan.plan(tiny(sft_cfg, **{"model.vocab_size": 384, "mesh.data": -1, "mesh.fsdp": 3}))
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        plan.plan(tiny(sft_cfg, **{"model.vocab_size": 384, "mesh.data": 2, "mesh.fsdp": 2}))


def test_a_vocabulary_from_a_tokenizer_must_be_given():
    with pytest.raises(ValueError, match="--config.model.vocab_size"):
        plan.plan(tiny(sft_cfg))


def test_fake_devices_replace_only_the_device_count_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8")
    plan.use_fake_cpu_devices(["plan", "--config=x.py", "--devices", "16"])
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=16"
    assert os.environ["JAX_PLATFORMS"] == "cpu"


@pytest.mark.slow
def test_the_command_compiles_for_the_devices_it_is_given(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [
        sys.executable,
        "-m",
        "rlhf_jax.plan",
        "--config=configs/sft.py:tiny",
        "--devices=4",
        "--config.mesh.fsdp=4",
        "--config.model.vocab_size=384",
        "--hbm_gib=0.5",
        f"--json={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["fits"] is True and "fits in 0.5 GiB" in proc.stdout


@pytest.mark.slow
def test_lora_drops_the_reference_copy_and_the_base_weights_optimizer_state():
    shape = {
        "model.vocab_size": 384,
        "model.d_model": 64,
        "reward.kind": "rm",
        "reward.rm_workdir": "unused",
        "mesh.data": 2,
        "mesh.fsdp": 4,
    }
    full = plan.plan(tiny(ppo_cfg, **shape))
    adapted = plan.plan(tiny(ppo_cfg, **shape, **{"model.lora.rank": 4}))
    assert adapted["frozen_bytes"] == pytest.approx(full["frozen_bytes"] / 2, rel=0.01)  # the RM alone
    assert adapted["params_bytes"] > full["params_bytes"]  # the adapters are added to the weights...
    assert adapted["opt_state_bytes"] < full["opt_state_bytes"] / 5  # ...and only they (and the head) get Adam moments
    assert adapted["total_bytes"] < full["total_bytes"]
