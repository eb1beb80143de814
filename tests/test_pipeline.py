"""The main job end to end on the tiny preset: every stage runs, the report has its numbers, reruns skip."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from rlhf_jax.pipeline import REUSE_KEYS, reusable_stages
from rlhf_jax.tasks import builtin
from tests.conftest import with_device_count
from tests.helpers import ROOT


def pipeline_config(preset="tiny"):
    spec = importlib.util.spec_from_file_location("pipeline_cfg", os.path.join(ROOT, "configs", "pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


TINY_CMD = [sys.executable, "-m", "rlhf_jax.pipeline", "--config=configs/pipeline.py:tiny", "--config.mesh.data=2"]
TINY_ENV = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 2))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny pipeline run, shared by the tests of this module (its workdir)."""
    workdir = tmp_path_factory.mktemp("tiny_pipeline")
    r = subprocess.run(
        TINY_CMD + [f"--workdir={workdir}"], cwd=ROOT, env=TINY_ENV, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_tiny_pipeline_produces_summary_report_and_plots_and_reruns_skip(tiny_run):
    tmp_path, env = tiny_run, TINY_ENV
    cmd = TINY_CMD + [f"--workdir={tmp_path}"]
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    for policy in ("sft", "policy"):
        assert 0.0 <= s[policy]["gold_score"] <= 1.0 and 0.0 <= s[policy]["harmful_rate"] <= 1.0
    assert 0.0 <= s["policy"]["win_rate_vs_sft"] <= 1.0 and isinstance(s["policy"]["kl"], float)
    assert s["policy"]["algorithm"] == "ppo"
    assert 0.0 <= s["rm"]["accuracy_vs_gold"] <= 1.0
    # InstructGPT Figure 1's prompted baselines: the pretrained model zero-shot and few-shot, judged alike
    assert s["gpt_zero_shot"]["shots"] == 0 and s["gpt_few_shot"]["shots"] == 2
    assert s["gpt_few_shot"]["prompt_tokens_mean"] > s["gpt_zero_shot"]["prompt_tokens_mean"]
    for row in ("gpt_zero_shot", "gpt_few_shot"):
        assert 0.0 <= s[row]["gold_score"] <= 1.0 and 0.0 <= s[row]["win_rate_vs_sft"] <= 1.0
    for policy in ("pretrained", "sft", "policy"):  # the alignment tax's measure: loss on held-out pretraining windows
        assert 0.0 < s[policy]["pretrain_loss"] < math.log(384) + 1
    # every row's responses are kept, in the prompts' order, for judging runs against one another afterwards
    responses = json.loads((tmp_path / "eval" / "responses.json").read_text())
    assert set(responses) == {"prompts", "gpt_zero_shot", "gpt_few_shot", "sft", "policy", "best_of_4_sft_by_rm"}
    assert all(len(v) == s["decoding"]["prompts"] for v in responses.values())
    win_rate = builtin.win_rate(responses["prompts"], responses["policy"], responses["sft"])
    assert win_rate == s["policy"]["win_rate_vs_sft"]
    report = (tmp_path / "report.md").read_text()
    assert "| PPO |" in report and "| GPT 2-shot |" in report and "## Samples" in report
    assert (tmp_path / "scores_vs_step.png").stat().st_size > 1000
    for stage in ("pretrain", "sft", "comparisons", "rm", "baselines", "policy", "eval"):
        assert (tmp_path / stage / "DONE.json").exists(), stage
    comps = (tmp_path / "comparisons" / "train.jsonl").read_text().splitlines()
    rec = json.loads(comps[0])
    assert sorted(rec["ranking"]) == list(range(len(rec["responses"])))

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier, skipped") == 7

    # An ablation run reuses every upstream stage of the finished run and reruns only the policy stage (here
    # GRPO against the gold judge, with a stage key the pipeline preset does not set itself).
    other = tmp_path / "ablation"
    cmd2 = [
        sys.executable,
        "-m",
        "rlhf_jax.pipeline",
        "--config=configs/pipeline.py:tiny",
        f"--workdir={other}",
        "--config.mesh.data=2",
        f"--config.reuse_from={tmp_path}",
        "--config.policy_reward=gold",
        "--config.policy=grpo",
        "--config.pg.kl.init_coef=0.05",
    ]
    third = subprocess.run(cmd2, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    for stage in ("pretrain", "sft", "comparisons", "rm", "baselines"):
        assert f"{stage}: reused from {tmp_path / stage}" in third.stdout
        assert not (other / stage).exists()
    assert (other / "policy" / "DONE.json").exists() and (other / "summary.json").exists()
    assert json.loads((other / "stages.json").read_text())["rm"] == str(tmp_path / "rm")
    policy_config = json.loads((other / "policy" / "config.json").read_text())
    assert policy_config["kl"]["init_coef"] == 0.05 and policy_config["reward"]["kind"] == "function"
    assert policy_config["pg"]["advantage"] == "grpo" and policy_config["kl"]["placement"] == "loss"
    ablation = json.loads((other / "summary.json").read_text())
    assert ablation["policy"]["algorithm"] == "grpo"
    # the seed's baselines are the first run's, decoded once: the same rows, and the same SFT sample
    # that the new policy's win rate is taken against
    for row in ("gpt_zero_shot", "gpt_few_shot", "sft", "best_of_4_sft_by_rm", "rm", "pretrained"):
        assert ablation[row] == s[row], row
    assert json.loads((other / "eval" / "responses.json").read_text())["sft"] == responses["sft"]
    assert "| GRPO |" in (other / "report.md").read_text()

    # Online DPO from the same SFT, its samples ranked by the RM loaded inside its mesh (the offline DPO family
    # on the pipeline's comparisons: test_a_pretrained_model_replaces_the_pretrain_stage_in_the_chosen_chat_format).
    run = tmp_path / "online_dpo"
    online = [f"--workdir={run}", f"--config.reuse_from={tmp_path}", "--config.policy=online_dpo"]
    r = subprocess.run(
        TINY_CMD + online + ["--config.dpo.num_steps=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["policy"]["algorithm"] == "online_dpo" and 0.0 <= s["policy"]["win_rate_vs_sft"] <= 1.0
    cfg = json.loads((run / "policy" / "config.json").read_text())
    assert cfg["stage"] == "dpo" and cfg["dpo"]["online"] and cfg["reward"]["rm_workdir"] == str(tmp_path / "rm")


@pytest.mark.slow
def test_the_colab_notebook_runs_top_to_bottom_and_shows_the_plots(tiny_run):
    """experiments/colab.ipynb executed by a Jupyter kernel, as in Colab. Its pipeline cell gets the finished tiny
    run of this module as its workdir (the same preset; its stages skip, as a rerun of the cell would), so the
    suite trains the tiny pipeline once; every other cell runs in full, the hand-driven SFT steps included."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "experiments", "colab.ipynb"), as_version=4)
    old = os.environ.get("RLHF_JAX_NOTEBOOK_WORKDIR")
    os.environ["RLHF_JAX_NOTEBOOK_WORKDIR"] = str(tiny_run)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
        ).execute()
    finally:
        if old is None:
            del os.environ["RLHF_JAX_NOTEBOOK_WORKDIR"]
        else:
            os.environ["RLHF_JAX_NOTEBOOK_WORKDIR"] = old
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # scores_vs_step.png and gold_vs_kl.png
    text = "".join(o.get("text", "") for o in outputs)
    assert "train/loss over 20 steps" in text and "RM accuracy vs the gold judge" in text


def test_every_data_key_is_tied_to_the_stages_that_read_it():
    # A data key missing from REUSE_KEYS would let a changed setting reuse stale stages.
    tied = {k for keys in REUSE_KEYS.values() for k in keys}
    assert {f"data.{k}" for k in pipeline_config().data} - tied == set()


def test_reuse_takes_the_unchanged_stages_whose_inputs_are_reused_too(tmp_path):
    base = pipeline_config()
    (tmp_path / "pipeline_config.json").write_text(json.dumps(base.to_dict(), default=str))
    for stage in REUSE_KEYS:
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE.json").write_text("{}")
    assert list(reusable_stages(pipeline_config(), str(tmp_path))) == [
        "pretrain",
        "sft",
        "comparisons",
        "rm",
        "baselines",
        "policy",
    ]
    c = pipeline_config()
    c.rm.optim.lr = 3e-4
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons"]
    c = pipeline_config()
    c.policy_reward = "gold"
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "baselines"]
    c = pipeline_config()
    c.policy = "rloo"  # another algorithm from the same SFT and RM: the same baselines
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "baselines"]
    c = pipeline_config()
    c.eval.few_shot = 4  # only the baselines read it (the policy's evaluation always runs)
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "policy"]
    c = pipeline_config()
    c.eval.max_new_tokens = 20  # the comparisons' samples are this long
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft"]
    c = pipeline_config()
    c.data.labeler_noise = 0.3  # new rankings: the RM and PPO are trained again
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft"]
    c = pipeline_config()
    c.data.num_ppo_prompts = 256
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "baselines"]
    c = pipeline_config()
    c.data.num_eval_prompts = 100
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "policy"]
    c = pipeline_config()
    c.sft.log.wandb, c.pg.progress = True, False  # how a stage reports is not what it produces
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "baselines", "policy"]
    c = pipeline_config()
    c.data.corpus_chars = 70_000  # another corpus changes everything downstream of it
    assert reusable_stages(c, str(tmp_path)) == {}
    c = pipeline_config()
    c.seed = 1
    assert reusable_stages(c, str(tmp_path)) == {}
    # A run written before a key existed ran with that key's default: it is still reused ...
    older = base.to_dict()
    del older["pg"]["pg"]["loss_aggregation"], older["pretrain"]["model"]["token_vocab"], older["policy"]
    (tmp_path / "pipeline_config.json").write_text(json.dumps(older, default=str))
    assert list(reusable_stages(pipeline_config(), str(tmp_path))) == [
        "pretrain",
        "sft",
        "comparisons",
        "rm",
        "baselines",
        "policy",
    ]
    # ... and so is one written before the policy-gradient stage was renamed: its config.ppo.ppo is config.pg.pg
    renamed = {**older, "ppo": {**older["pg"], "stage": "ppo", "ppo": older["pg"]["pg"]}}
    del renamed["pg"], renamed["ppo"]["pg"]
    (tmp_path / "pipeline_config.json").write_text(json.dumps(renamed, default=str))
    assert list(reusable_stages(pipeline_config(), str(tmp_path))) == [
        "pretrain",
        "sft",
        "comparisons",
        "rm",
        "baselines",
        "policy",
    ]
    c = pipeline_config()
    c.pg.pg.loss_aggregation = "token_sum"  # ... unless this run sets it otherwise
    assert list(reusable_stages(c, str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "baselines"]
    # a run from before the baselines stage (or one killed during it): its policy is reused all the same
    (tmp_path / "baselines" / "DONE.json").unlink()
    assert list(reusable_stages(pipeline_config(), str(tmp_path))) == ["pretrain", "sft", "comparisons", "rm", "policy"]
    (tmp_path / "sft" / "DONE.json").unlink()  # an unfinished stage there is run here, and so is all after it
    assert list(reusable_stages(pipeline_config(), str(tmp_path))) == ["pretrain"]
    with pytest.raises(FileNotFoundError, match="reuse_from.*pipeline_config.json does not exist"):
        reusable_stages(pipeline_config(), str(tmp_path / "nowhere"))


def test_reuse_of_a_run_from_a_pretrained_model_starts_at_sft(tmp_path):
    """A run whose pretrain stage was config.pretrained has no pretrain/DONE.json: its later stages are reused
    all the same when the pretrained model (and every other upstream key) is the same, and not otherwise."""
    base = pipeline_config()
    base.pretrained = "models/some_hf_dir"
    (tmp_path / "pipeline_config.json").write_text(json.dumps(base.to_dict(), default=str))
    for stage in ("sft", "comparisons", "rm", "policy"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "DONE.json").write_text("{}")
    c = pipeline_config()
    c.pretrained, c.policy = "models/some_hf_dir", "grpo"
    assert list(reusable_stages(c, str(tmp_path))) == ["sft", "comparisons", "rm"]
    c.pretrained = "models/another_hf_dir"
    assert list(reusable_stages(c, str(tmp_path))) == []


def test_reuse_follows_a_run_that_itself_reused_stages(tmp_path):
    # base ran every stage; mid reused base's pretrain and ran the rest: a run reusing mid finds the
    # pretrain in base (mid/stages.json), so chains of ablations do not pretrain again.
    base, mid = tmp_path / "base", tmp_path / "mid"
    for run in (base, mid):
        run.mkdir()
        (run / "pipeline_config.json").write_text(json.dumps(pipeline_config().to_dict(), default=str))
    (base / "pretrain").mkdir()
    (base / "pretrain" / "DONE.json").write_text("{}")
    for stage in ("sft", "comparisons", "rm", "policy"):
        (mid / stage).mkdir()
        (mid / stage / "DONE.json").write_text("{}")
    stages = {s: str(mid / s) for s in ("sft", "comparisons", "rm", "policy")} | {"pretrain": str(base / "pretrain")}
    (mid / "stages.json").write_text(json.dumps(stages))
    assert reusable_stages(pipeline_config(), str(mid)) == stages
    (mid / "stages.json").unlink()  # without the record, mid's own (missing) pretrain ends the reuse
    assert reusable_stages(pipeline_config(), str(mid)) == {}


def test_every_stage_key_can_be_overridden_and_unknown_ones_are_named():
    c = pipeline_config("default")
    assert c.pg.kl.init_coef == 0.15 and c.pg.optim.lr == 3e-5  # configs/ppo.py, then the pipeline's overrides
    assert c.rm.rm.loss == "ranking" and c.pretrain.model.d_model == 128
    from rlhf_jax.config import stage_config

    with pytest.raises(ValueError, match="config.pg.optim.lrr: no such field"):
        stage_config("ppo", "default", {"optim": {"lrr": 1.0}})


def test_best_of_n_curve_picks_by_rm_and_by_gold_and_compares_with_sample_zero():
    from rlhf_jax.pipeline_eval import best_of_n_curve

    # 3 samples of 2 prompts; sample 0 is the baseline. The RM prefers sample 2 on prompt 0 (worse by gold)
    # and sample 1 on prompt 1 (better by gold).
    gold = [[0.5, 0.0], [1.0, 1.0], [0.0, 0.5]]
    rm = [[0.0, 0.0], [0.1, 0.9], [0.9, 0.2]]
    one, two, three = best_of_n_curve(rm, gold, [1, 2, 3])
    assert one == {"n": 1, "gold_by_rm": 0.25, "win_by_rm": 0.5, "gold_oracle": 0.25, "win_oracle": 0.5}
    assert two == {"n": 2, "gold_by_rm": 1.0, "win_by_rm": 1.0, "gold_oracle": 1.0, "win_oracle": 1.0}
    assert three["gold_by_rm"] == 0.5 and three["win_by_rm"] == 0.5  # prompt 0 lost, prompt 1 won
    assert three["gold_oracle"] == 1.0 and three["win_oracle"] == 1.0
    with pytest.raises(ValueError, match="between 1 and the 3 samples"):
        best_of_n_curve(rm, gold, [4])


def test_best_of_n_script_names_a_directory_that_is_not_a_finished_run(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/best_of_n.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "is not a finished pipeline run" in out.stderr


def test_within_prompt_correlation_is_taken_across_each_prompts_samples():
    from rlhf_jax.pipeline_eval import within_prompt_correlation

    # prompt 0: RM falls as length rises (−1); prompt 1: rises with it (+1); prompt 2: constant length, left out.
    rm = [[3.0, 0.0, 5.0], [2.0, 1.0, 1.0], [1.0, 2.0, 0.0]]
    length = [[1, 1, 4], [2, 2, 4], [3, 3, 4]]
    assert within_prompt_correlation(rm, length) == pytest.approx(0.0)
    assert within_prompt_correlation(rm, [[1, 3, 4], [2, 2, 4], [3, 1, 4]]) == pytest.approx(-1.0)
    assert math.isnan(within_prompt_correlation(rm, [[4, 4, 4]] * 3))


@pytest.mark.slow
def test_a_pretrained_model_replaces_the_pretrain_stage_in_the_chosen_chat_format(tiny_run, tmp_path):
    """config.pretrained (here the tiny run's pretrained model exported as an HF directory, as
    configs/pipeline.py:smollm2 uses SmolLM2's): no pretrain stage or corpus, SFT starts from it, its prompted
    rows are the report's first rows, and every stage and the evaluation render the task in config.data's
    chat template (here the HH one)."""
    from rlhf_jax import checkpoint
    from rlhf_jax.convert import export_workdir

    hf_dir = export_workdir(str(tiny_run / "pretrain"), str(tmp_path / "pretrained"))
    run = tmp_path / "run"
    cmd = TINY_CMD + [f"--workdir={run}", f"--config.pretrained={hf_dir}", "--config.data.chat_template=hh"]
    # the wiring, not learning; the policy from the DPO family, trained on the pipeline's own comparisons
    cmd += ["--config.sft.num_steps=4", "--config.rm.num_steps=4", "--config.policy=plackett_luce"]
    cmd += ["--config.dpo.num_steps=4"]
    r = subprocess.run(cmd, cwd=ROOT, env=TINY_ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (run / "pretrain").exists() and not (run / "data" / "corpus.txt").exists()
    for stage in ("sft", "rm", "policy"):
        assert checkpoint.read_run_config(str(run / stage))["data"]["chat_template"] == "hh", stage
    assert checkpoint.read_run_config(str(run / "sft"))["init_from"] == hf_dir
    policy = checkpoint.read_run_config(str(run / "policy"))
    assert policy["stage"] == "dpo" and policy["dpo"]["loss"] == "plackett_luce" and not policy["dpo"]["online"]
    assert policy["data"]["train_path"] == str(run / "comparisons" / "train.jsonl")
    s = json.loads((run / "summary.json").read_text())
    assert s["policy"]["algorithm"] == "plackett_luce" and 0.0 <= s["policy"]["win_rate_vs_sft"] <= 1.0
    assert s["pretrained"] == {"path": hf_dir} and "pretrain_loss" not in s["sft"]
    prompts = json.loads((run / "eval" / "responses.json").read_text())["prompts"]
    assert all(p.lstrip().startswith("Human:") for p in prompts), prompts[0]  # decoded in the HH template
    assert "| pretrained zero-shot |" in (run / "report.md").read_text()
    missing = subprocess.run(
        TINY_CMD + [f"--workdir={tmp_path / 'missing'}", f"--config.pretrained={tmp_path / 'nowhere'}"],
        cwd=ROOT,
        env=TINY_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "config.pretrained=" in missing.stderr and "convert gguf" in missing.stderr
