"""Gao et al.'s over-optimisation fit recovers known coefficients and finds the peak."""

import json

import numpy as np
import pytest

from experiments._analysis import fit_gao, gao_peak, ppo_curve


def test_fit_gao_recovers_alpha_beta_and_the_peak():
    d = np.linspace(0.05, 3.0, 40)
    alpha, beta = 0.4, 0.3
    gain = d * (alpha - beta * np.log(d)) + np.random.default_rng(0).normal(0, 1e-3, d.shape)
    a, b = fit_gao(np.concatenate([[0.0], d]), np.concatenate([[0.0], gain]))  # d = 0 is dropped
    assert a == pytest.approx(alpha, abs=5e-3) and b == pytest.approx(beta, abs=5e-3)
    peak = gao_peak(a, b)
    grid = np.linspace(0.01, 5, 5000)
    assert peak == pytest.approx(grid[np.argmax(grid * (alpha - beta * np.log(grid)))], rel=0.02)
    assert gao_peak(0.4, -0.1) == float("inf")
    with pytest.raises(ValueError, match="two points"):
        fit_gao([0.0, 1.0], [0.0, 0.1])


def test_ppo_curve_averages_windows_and_clamps_negative_kl(tmp_path):
    (tmp_path / "policy").mkdir()
    lines = [
        json.dumps(
            {
                "step": i + 1,
                "objective/kl": -0.5 if i < 2 else float(i),
                "objective/monitor_score": 0.1 * i,
                "objective/scores": float(i) + 0.5,
            }
        )
        for i in range(4)
    ]
    (tmp_path / "policy" / "metrics.jsonl").write_text("\n".join(lines + ['{"step": 5, "eval": 1}', "{trunc"]) + "\n")
    c = ppo_curve(str(tmp_path), window=2)
    np.testing.assert_allclose(c["kl"], [-0.5, 2.5])
    np.testing.assert_allclose(c["d"], [0.0, np.sqrt(2.5)])
    np.testing.assert_allclose(c["gold"], [0.05, 0.25])
    np.testing.assert_allclose(c["proxy"], [1.0, 3.0])
    np.testing.assert_allclose(c["proxy_init"], 0.5)  # iteration 1 alone: the initial policy


def test_policy_stage_seconds_from_the_record_or_from_the_log_of_the_run_that_trained_it(tmp_path):
    from experiments._analysis import policy_stage_seconds

    trained, reusing = tmp_path / "trained", tmp_path / "reusing"
    (trained / "policy").mkdir(parents=True)
    (trained / "policy" / "DONE.json").write_text("{}")  # a run from before DONE.json held wall_s
    (trained / "sweep.log").write_text(
        f"[23:59:30] pipeline: rm: finished earlier, skipped (x)\n[23:59:50] pipeline: grpo: running in "
        f"{trained / 'policy'}\nnoise\n[00:00:36] pipeline: evaluation: running in {trained / 'eval'}\n"
    )
    reusing.mkdir()
    (reusing / "stages.json").write_text(json.dumps({"policy": str(trained / "policy")}))
    assert policy_stage_seconds(str(trained)) == policy_stage_seconds(str(reusing)) == 46.0  # across midnight
    (trained / "policy" / "DONE.json").write_text(json.dumps({"wall_s": 12.5}))
    assert policy_stage_seconds(str(reusing)) == 12.5
    assert policy_stage_seconds(str(tmp_path / "nowhere")) is None


def test_a_variant_is_tuned_paired_and_reported_apart_from_its_algorithm(monkeypatch):
    """GRPO + TIS (experiments/algorithms_tuning.VARIANTS) is GRPO with a stage key changed: its runs get their
    own lr, their own seed-0 base (the tuning run of that lr) and their own row in the paired differences."""
    from experiments import algorithms as h2h, algorithms_tuning as tuning, run_names

    assert tuning.label({"policy": "grpo", "pg.pg.rollout_correction": "tis"}) == "grpo+tis"
    assert tuning.label({"policy": "grpo", "pg.pg.rollout_correction": None}) == "grpo"
    assert tuning.label({"policy": "grpo"}) == "grpo"
    assert tuning.stage_of("grpo+tis") == "pg" and "grpo+tis" in tuning.NAMES

    def row(policy, lr, gold, seed=0, **keys):
        return {"status": "finished", "policy": policy, "pg.optim.lr": lr, "seed": seed, "policy/gold_score": gold,
                "policy/kl": 1.0, **keys}  # fmt: skip

    tis = {"pg.pg.rollout_correction": "tis"}
    rows = [
        row("grpo", 3e-5, 0.6),
        row("grpo", 1e-4, 0.5),
        row("grpo", 3e-5, 0.4, **tis),
        row("grpo", 1e-4, 0.7, **tis),
    ]
    assert tuning.chosen(rows) == {"grpo": 3e-5, "grpo+tis": 1e-4}

    monkeypatch.setitem(h2h.CHOSEN_LR, "grpo+tis", 1e-4)
    base = h2h._base("grpo+tis", 0)
    assert base == f"{h2h.TUNING_ROOT}/policy=grpo,rollout_correction=tis,pg.optim.lr=0.0001"
    assert base.split("/")[-1] in run_names(tuning.SWEEP)
    assert h2h._keys("grpo+tis") == {"policy": "grpo", "pg.pg.rollout_correction": "tis"}
    seeds = [
        row(p, 3e-5, g + s / 10, seed=s, **k) for s in (0, 1, 2) for p, g, k in [("ppo", 0.5, {}), ("grpo", 0.6, tis)]
    ]
    seeds += [row("grpo", 3e-5, 0.4 + s / 10, seed=s) for s in (0, 1, 2)]
    paired = h2h.paired_vs(seeds, metrics=("gold_score",))
    assert paired["grpo+tis"]["gold_score"]["mean"] == pytest.approx(0.1)
    assert paired["grpo"]["gold_score"]["mean"] == pytest.approx(-0.1)


def test_pooling_an_earlier_analysis_with_new_seeds_equals_the_analysis_of_all_runs():
    """experiments.algorithms.pooled: seeds 0-2 known only by aggregate() and paired_vs() (their runs gone), joined
    with seeds 3-4's runs, give what aggregate() and paired_vs() give on all five seeds' runs."""
    from experiments import algorithms as h2h

    rng = np.random.default_rng(0)
    rows = []
    for seed in range(5):
        for policy, keys in [("ppo", {}), ("grpo", {}), ("grpo", {"pg.pg.rollout_correction": "tis"})]:
            row = {"status": "finished", "policy": policy, "seed": seed, "pg.optim.lr": 3e-5, **keys}
            row |= {f"policy/{m}": float(rng.uniform()) for m, _ in h2h.METRICS}
            row |= {f"best_of_4_sft_by_rm/{m}": float(rng.uniform()) for m, _ in h2h.METRICS}
            rows.append(row | {"sft/gold_score": float(rng.uniform())})
    earlier = [r for r in rows if r["seed"] < 3]
    later = [r for r in rows if r["seed"] >= 3]
    stats, paired = h2h.pooled(h2h.aggregate(earlier), h2h.paired_vs(earlier), later)
    want, want_paired = h2h.aggregate(rows), h2h.paired_vs(rows)
    assert set(stats) == set(want) == {"ppo", "grpo", "grpo+tis", "best_of_4_by_rm", "sft"}
    for label in want:
        assert set(stats[label]) == set(want[label]), label
        for m in want[label]:
            for k in ("mean", "std", "lo", "hi", "n", "mean_1_4"):
                assert stats[label][m][k] == pytest.approx(want[label][m][k], rel=1e-9), (label, m, k)
    assert set(paired) == set(want_paired) == {"grpo", "grpo+tis"}
    for label in want_paired:
        for m in want_paired[label]:
            for k in ("mean", "lo", "hi", "n"):
                assert paired[label][m][k] == pytest.approx(want_paired[label][m][k], rel=1e-9), (label, m, k)
    with pytest.raises(ValueError, match="seed 0 belongs to the earlier analysis"):
        h2h.pooled(h2h.aggregate(earlier), h2h.paired_vs(earlier), rows)


def _rlvr_script():
    import importlib.util
    import os

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("smollm2_rlvr", os.path.join(ROOT, "scripts", "smollm2_rlvr.py"))
    rlvr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rlvr)
    return rlvr


def test_the_rlvr_comparison_pairs_each_algorithm_with_grpo_by_seed(tmp_path):
    """scripts/smollm2_rlvr.py --compare: an algorithm's gold after the last iteration minus GRPO's on the same
    seed, with the t-interval over the seeds both finished; an unfinished seed is left out."""
    rlvr = _rlvr_script()
    golds = {"grpo": {0: 0.10, 1: 0.20, 2: 0.30}, "gspo": {0: 0.15, 1: 0.22, 2: 0.40, 3: 0.9}}
    for name, seeds in golds.items():
        for seed, gold in seeds.items():
            last = rlvr.ITERATIONS if seed < 3 else rlvr.ITERATIONS - rlvr.EVERY  # seed 3 unfinished
            row = {"all": {"gold_score": gold, "correct_rate": 0.0, "answer_correct_rate": 0.5}, "response_tokens": 9}
            evals = {str(it): {**row, "train_s": 60.0, "eval_s": 0.0} for it in range(0, last + 1, rlvr.EVERY)}
            (tmp_path / name / f"seed={seed}").mkdir(parents=True)
            (tmp_path / name / f"seed={seed}" / "evals.json").write_text(json.dumps(evals))
    table = rlvr.compare({name: str(tmp_path / name) for name in golds}).splitlines()
    gspo = next(line for line in table if line.startswith("| GSPO |")).split(" | ")
    d = np.array([0.05, 0.02, 0.10])
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # Student's t, 2 degrees of freedom
    assert gspo[1] == "0, 1, 2" and gspo[2] == "0.257 [0.150, 0.220, 0.400]"
    assert gspo[3] == f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] (+0.050, +0.020, +0.100)"
    assert gspo[5] == "0.500" and gspo[7].startswith(str(len(range(0, rlvr.ITERATIONS + 1, rlvr.EVERY))))


def test_the_rlvr_script_runs_any_policy_gradient_algorithm_at_grpos_sizes():
    """scripts/smollm2_rlvr.py --algorithm: the algorithm's own loss, KL and DAPO settings over the rlvr preset,
    whose sizes, lr and schedule stay GRPO's (the same budget for every row); a name that is not a
    policy-gradient algorithm or variant stops with the list."""
    from rlhf_jax import algorithms

    rlvr = _rlvr_script()
    grpo = rlvr.stage_config(0, "train.jsonl", 10, "models/smollm2")
    assert rlvr.algorithm_overrides("grpo") == {}
    for name in ("gspo", "cispo", "dapo", "grpo+tis"):
        c = rlvr.stage_config(0, "train.jsonl", 10, "models/smollm2", name)
        for key in ("batch_size", "num_steps", "seed"):
            assert c[key] == grpo[key], (name, key)
        assert c.rollout == grpo.rollout and c.optim == grpo.optim and c.data == grpo.data, name
        settings = algorithms.algorithms()[name.split("+")[0]].settings
        assert c.kl.init_coef == settings["kl"]["init_coef"], name
        for key, value in settings["pg"].items():
            assert c.pg[key] == (rlvr.MAX_NEW_TOKENS // 5 if key == "overlong_cache" else value), (name, key)
    assert rlvr.stage_config(0, "t", 10, "b", "grpo+tis").pg.rollout_correction == "tis"
    assert grpo.pg.rollout_correction == "none" and not grpo.pg.dynamic_sampling
    with pytest.raises(SystemExit, match="not a policy-gradient algorithm.*grpo"):
        rlvr.algorithm_overrides("dpo")
