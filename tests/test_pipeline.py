"""The main job end to end on the tiny preset: every stage runs, the report has its numbers, reruns skip."""

import json
import os
import subprocess
import sys

from tests.test_lm_stage import ROOT


def test_tiny_pipeline_produces_summary_report_and_plots_and_reruns_skip(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "rlhf_jax.pipeline", "--config=configs/pipeline.py:tiny", f"--workdir={tmp_path}",
           "--config.mesh.data=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    for policy in ("sft", "ppo"):
        assert 0.0 <= s[policy]["gold_score"] <= 1.0 and 0.0 <= s[policy]["harmful_rate"] <= 1.0
    assert 0.0 <= s["ppo"]["win_rate_vs_sft"] <= 1.0 and isinstance(s["ppo"]["kl"], float)
    assert 0.0 <= s["rm"]["accuracy_vs_gold"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| PPO |" in report and "## Samples" in report
    assert (tmp_path / "scores_vs_step.png").stat().st_size > 1000
    for stage in ("pretrain", "sft", "comparisons", "rm", "ppo", "eval"):
        assert (tmp_path / stage / "DONE.json").exists(), stage
    comps = (tmp_path / "comparisons" / "train.jsonl").read_text().splitlines()
    rec = json.loads(comps[0])
    assert sorted(rec["ranking"]) == list(range(len(rec["responses"])))

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier, skipped") == 6
