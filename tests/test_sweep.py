"""Sweeps: experiment files, run names, launch files, and a local sweep end to end (summary, skip on rerun)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import with_device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import load_experiment, product, run_names  # noqa: E402

_spec = importlib.util.spec_from_file_location("sweep_script", os.path.join(ROOT, "scripts", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

SHIPPED = sorted(
    os.path.join(ROOT, "experiments", f)
    for f in os.listdir(os.path.join(ROOT, "experiments"))
    if f.endswith(".py") and not f.startswith("_")
)  # _*.py: helpers, not experiments


def _experiment(tmp_path, body: str, name: str = "exp") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("from experiments import product\n" + body)
    return str(path)


def test_product_is_every_combination_first_axis_slowest():
    assert product({"optim.lr": [1e-3, 3e-3]}, seed=[0, 1]) == [
        {"optim.lr": 1e-3, "seed": 0},
        {"optim.lr": 1e-3, "seed": 1},
        {"optim.lr": 3e-3, "seed": 0},
        {"optim.lr": 3e-3, "seed": 1},
    ]
    for bad in ([], "0.1", 0.1):
        with pytest.raises(ValueError, match="'seed' needs a non-empty list"):
            product(seed=bad)


def test_run_names_are_readable_unique_and_safe_as_directories():
    assert run_names([{"optim.lr": 0.001, "seed": 1}, {"optim.lr": 3e-05, "seed": 1}]) == [
        "lr=0.001,seed=1",
        "lr=3e-05,seed=1",
    ]
    # Two keys ending alike keep their full paths; {} is the baseline; path separators never appear.
    assert run_names([{"optim.b1": 0.9, "kl.b1": 1}, {}]) == ["optim.b1=0.9,kl.b1=1", "base"]
    assert run_names([{"reward.function": "pkg.mod:f/g"}]) == ["function=pkg.mod-f-g"]
    with pytest.raises(ValueError, match=r"SWEEP\[0\] and SWEEP\[1\] both get the run name 'lr=0.1'"):
        run_names([{"optim.lr": 0.1}, {"optim.lr": 0.1000001}])


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_experiments_load_and_check_against_their_base_config(path):
    exp = load_experiment(path)
    assert len(exp.runs) >= 3 and len({r.name for r in exp.runs}) == len(exp.runs)
    module = "rlhf_jax.pipeline" if exp.base.startswith("configs/pipeline.py") else "rlhf_jax.main"
    assert exp.columns and exp.module == module
    cmd = sweep.command(exp, exp.runs[0], "/w", "python")
    assert cmd[:5] == ["python", "-m", module, f"--config={exp.base}", "--workdir=/w"]
    assert all(f"--config.{k}={sweep.cli_value(v)}" in cmd for k, v in exp.runs[0].overrides.items())


def test_kl_ablation_varies_only_the_kl_coefficient_with_a_fixed_controller():
    exp = load_experiment(os.path.join(ROOT, "experiments", "kl_coef_ppo.py"))
    assert exp.swept_keys == ["kl.init_coef"] and exp.stage == "pg"
    assert all(r.overrides["kl.kind"] == "fixed" and r.overrides["reward.kind"] == "function" for r in exp.runs)


def test_a_misspelt_key_fails_before_anything_runs_naming_file_and_key(tmp_path):
    path = _experiment(tmp_path, 'BASE = "configs/pretrain.py:tiny"\nSWEEP = [dict(seed=0), {"optim.lrr": 1e-3}]\n')
    with pytest.raises(ValueError, match=r"exp.py: SWEEP\[1\] sets 'optim.lrr', which is not a field of configs/"):
        load_experiment(path)
    old = _experiment(tmp_path, 'BASE = "configs/pipeline.py:tiny"\nSWEEP = [{"ppo.kl.init_coef": 0.1}]\n', "old")
    with pytest.raises(
        ValueError, match="sets 'ppo.kl.init_coef', which is not a field .* It is 'pg.kl.init_coef' now"
    ):
        load_experiment(old)  # a key of the policy-gradient stage under its old name
    with pytest.raises(FileNotFoundError, match="BASE='configs/nope.py:tiny'"):
        load_experiment(_experiment(tmp_path, 'BASE = "configs/nope.py:tiny"\nSWEEP = [dict(seed=0)]\n', "nope"))
    with pytest.raises(ValueError, match="SWEEP must be a non-empty list of dicts"):
        load_experiment(_experiment(tmp_path, 'BASE = "configs/pretrain.py:tiny"\nSWEEP = []\n', "empty"))


def test_a_run_is_finished_only_with_its_final_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_steps": 6}))
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    assert not sweep.finished(str(tmp_path), "pretrain")  # e.g. stopped by SIGTERM after step 3 (exit 143)
    (tmp_path / "checkpoints" / "6").mkdir()
    assert sweep.finished(str(tmp_path), "pretrain")
    assert not sweep.finished(str(tmp_path), "pipeline") and sweep.completed(str(tmp_path), "pg")


def test_summary_values_are_the_last_logged_or_the_mean_of_the_last_few(tmp_path):
    records = [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 2, "eval/a": 7.0}, {"step": 3, "a": 6.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "a"')
    assert sweep.last_values(str(tmp_path), "pg") == {"step": 3, "a": 6.0, "eval/a": 7.0}  # torn last line ignored
    assert sweep.last_values(str(tmp_path), "pg", average_last=2)["a"] == 4.0
    (tmp_path / "summary.json").write_text(json.dumps({"ppo": {"gold_score": 0.5}, "rm": {"accuracy_vs_gold": 0.9}}))
    assert sweep.last_values(str(tmp_path), "pipeline") == {"ppo/gold_score": 0.5, "rm/accuracy_vs_gold": 0.9}


def test_a_finished_run_is_not_skipped_once_the_experiment_changed_its_overrides(tmp_path):
    exp = load_experiment(_experiment(tmp_path, 'BASE = "configs/pretrain.py:tiny"\nSWEEP = [dict(seed=0)]\n'))
    (tmp_path / "root" / "seed=0").mkdir(parents=True)
    (tmp_path / "root" / "seed=0" / "DONE.json").write_text(json.dumps({"overrides": {"seed": 0, "num_steps": 5}}))
    with pytest.raises(ValueError, match=r"seed=0 finished with overrides .* Use another --root"):
        sweep.run_local(exp, str(tmp_path / "root"), workers=1, python=sys.executable)


def test_launch_files_hold_every_unfinished_run_and_are_valid_bash(tmp_path):
    path = os.path.join(ROOT, "experiments", "lr_sweep_tiny.py")
    exp = load_experiment(path)
    root = tmp_path / "root"
    assert (
        sweep.main(
            [path, "--root", str(root), "--emit", "slurm", "--nodes", "2", "--workers", "3", "--sbatch=--partition=gpu"]
        )
        == 0
    )
    script = (root / "launch" / "sweep.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(exp.runs) - 1}%3" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --nodes=2" in script and all(f"--workdir={root}/{r.name} " in script for r in exp.runs)
    # Preemption (tests/test_slurm.py runs it on a real SLURM): requeue, USR1 before the limit, a bounded self-requeue.
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and '"${SLURM_RESTART_COUNT:-0}" -lt 10 ]' in script
    subprocess.run(["bash", "-n", str(root / "launch" / "sweep.sbatch")], check=True)

    (root / exp.runs[0].name).mkdir(parents=True)
    (root / exp.runs[0].name / "DONE.json").write_text("{}")  # finished: left out of the next launch
    assert sweep.main([path, "--root", str(root), "--emit", "tpu"]) == 0
    tpu = (root / "launch" / "tpu_pod.sh").read_text()
    commands = [line for line in tpu.splitlines() if line.startswith("remote ")]
    assert len(commands) == len(exp.runs) - 1 and f"{exp.runs[0].name} " not in tpu
    assert all("--worker=all" in tpu and "RLHF_JAX_DISTRIBUTED=1 python3 -m rlhf_jax.main" in c for c in commands)
    subprocess.run(["bash", "-n", str(root / "launch" / "tpu_pod.sh")], check=True)


QUICK = """
BASE = "configs/pretrain.py:tiny"
FIXED = {"num_steps": 3, "log_every": 1, "eval_every": 3, "checkpoint.every": 3, "data.builtin_chars": 20000}
SWEEP = product({"optim.lr": [1e-3, 3e-3]}, seed=[0, 1])
"""


@pytest.mark.slow
def test_local_sweep_runs_two_at_a_time_summarises_and_skips_finished_runs_on_rerun(tmp_path):
    path, root = _experiment(tmp_path, QUICK, "quick"), tmp_path / "sweeps" / "quick"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 1))
    cmd = [sys.executable, "scripts/sweep.py", path, "--root", str(root), "--workers", "2"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": started") == 4 and first.stdout.count(": finished in") == 4
    assert first.stdout.index("started (2/4)") < first.stdout.index("finished in")  # two ran side by side

    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0", "lr=0.003,seed=1"]
    for r in rows:
        workdir = root / r["run"]
        config = json.loads((workdir / "config.json").read_text())
        assert config["optim"]["lr"] == float(r["optim.lr"]) and config["seed"] == int(r["seed"])
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert float(r["train/loss"]) == [m["train/loss"] for m in metrics if "train/loss" in m][-1]
        assert float(r["eval/loss"]) == [m["eval/loss"] for m in metrics if "eval/loss" in m][-1]
        assert r["status"] == "finished" and (workdir / "DONE.json").exists()
    assert len({r["train/loss"] for r in rows}) == 4  # each run really got its own lr and seed
    table = (root / "summary.md").read_text()
    assert sum(line.startswith("| lr=") for line in table.splitlines()) == 4
    assert (root / "summary.png").stat().st_size > 10_000

    stamps = {r["run"]: (root / r["run"] / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished earlier, skipped") == 4 and ": started" not in again.stdout
    assert stamps == {r: (root / r / "metrics.jsonl").stat().st_mtime_ns for r in stamps}


def _sky_task(yaml_path: str):
    """The task as SkyPilot itself reads it (its schema and its resources checks; no cloud is asked)."""
    sky = pytest.importorskip(
        "sky", reason="skypilot is not installed (scripts/setup_env.sh installs it from requirements-cloud-test.txt)"
    )
    return sky.Task.from_yaml(yaml_path)


@pytest.mark.parametrize(
    "accelerators,nodes,storage,chips",
    [
        ("tpu-v5e-16", 1, "gs://my-bucket/sweeps/kl", {"tpu-v5e-16": 1}),
        ("H100:8", 2, "s3://my-bucket/sweeps/kl", {"H100": 8}),
        ("H100:8", 1, "/nfs/sweeps/kl", {"H100": 8}),  # storage every node mounts already
    ],
)
def test_skypilot_task_is_a_valid_managed_job_that_resumes_the_sweep(
    tmp_path, capsys, accelerators, nodes, storage, chips
):
    path = os.path.join(ROOT, "experiments", "kl_coef_ppo.py")
    args = [path, "--root", str(tmp_path), "--emit", "skypilot", "--storage", storage]
    assert sweep.main([*args, "--accelerators", accelerators, "--nodes", str(nodes), "--max-requeues", "3"]) == 0
    yaml_path = str(tmp_path / "launch" / "skypilot.yaml")
    assert f"sky jobs launch --name kl_coef_ppo --yes {yaml_path}" in capsys.readouterr().out
    task = _sky_task(yaml_path)
    (resources,) = task.resources
    assert task.num_nodes == nodes and resources.use_spot and dict(resources.accelerators) == chips
    assert resources.job_recovery == {
        "strategy": "EAGER_NEXT_REGION",
        "max_restarts_on_errors": 3,
        "recover_on_exit_codes": [sweep.PREEMPTED],  # a run stopped by SIGTERM recovers, always
    }
    # The sweep itself runs: it skips runs with DONE.json and resumes the interrupted one from the shared root.
    root = "/sweep" if "://" in storage else storage
    assert task.run.splitlines()[-1] == f"python scripts/sweep.py experiments/kl_coef_ppo.py --root {root}"
    assert (root in task.storage_mounts) == ("://" in storage)
    if accelerators.startswith("tpu-"):
        assert "export RLHF_JAX_DISTRIBUTED=1" in task.run and "SKYPILOT_NODE_IPS" not in task.run
        assert "jax[tpu]==" in task.setup
    else:
        assert ('RLHF_JAX_PROCESS_ID="$SKYPILOT_NODE_RANK"' in task.run) == (nodes > 1)
        assert "jax[cuda12]==" in task.setup
    with pytest.raises(SystemExit, match=r"a TPU slice \(tpu-v5e-16\) is one SkyPilot node"):
        sweep.main([*args, "--accelerators", "tpu-v5e-16", "--nodes", "2"])
