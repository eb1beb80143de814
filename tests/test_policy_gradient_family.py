"""The critic-free family in the one policy-gradient loop: GRPO learns a verifiable reward standalone, never
touches the value head and resumes exactly; every estimator runs; the configs carry the papers' settings;
the pipeline applies an algorithm's settings under the user's overrides."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs.cispo as cispo_cfg
import configs.dapo as dapo_cfg
import configs.grpo as grpo_cfg
import configs.gspo as gspo_cfg
import configs.reinforce_pp as reinforce_pp_cfg
import configs.rloo as rloo_cfg
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import pg
from tests.helpers import by_step, resumed_from, stopped_copy, tiny

REWARD = {"reward.function": "tests.test_pg_stage:even_token_share"}


def saved_params(workdir, step=None):
    with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("params",)) as m:
        return m.restore(
            step if step is not None else m.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore())
        )["params"]


@pytest.mark.slow
def test_grpo_tiny_raises_a_verifiable_reward_and_never_trains_the_value_head(tmp_path, capsys):
    c = tiny(grpo_cfg, num_steps=20, **REWARD, **{"optim.lr": 1e-2, "checkpoint.every": 1, "checkpoint.keep": 30})
    pg.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    scores = [m[s]["objective/scores"] for s in sorted(m)]
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.1, scores
    last = m[20]
    for key in (
        "loss/policy_avg",
        "loss/kl_avg",
        "policy/approxkl_avg",
        "objective/kl",
        "kl_coef",
        "policy/logprob_change_first_minibatch",
        "policy/entropy_avg",
    ):
        assert np.isfinite(last[key]), key
    # π_old is π_θ (one update per batch): the score step ran no policy forward pass, so there is no separate
    # recomputation to compare the sampler with; the update's first minibatch compares them instead
    assert "sampler/logprob_gap_mean" not in last and "objective/entropy" not in last
    assert "loss/value_avg" not in last  # no critic: no value loss at all
    # Shapes follow the data (rollout.length_bucket): prompts of 16 or 32 padded tokens here, responses ragged.
    # XLA compiles only in an iteration that meets a (prompt, response) width pair for the first time.
    seen, widths = set(), set()
    for s in sorted(m)[1:]:
        pair = (m[s]["perf/prompt_width"], m[s]["perf/response_width"])
        if m[s]["perf/compilations"] > m[s - 1]["perf/compilations"]:
            assert pair not in seen, (s, pair, "recompiled for shapes it had already run")
        seen.add(pair)
        widths.add(m[s]["perf/prompt_width"])
    assert widths <= {16, 32, 48} and len(seen) <= 3, seen
    assert len({m[s]["objective/response_length"] for s in m}) > 1  # ragged responses
    assert last["kl_coef"] == pytest.approx(0.04)  # DeepSeekMath's β, fixed
    # one update per batch: the policy the update starts from is the one that sampled, so the ratio is 1
    assert last["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and last["policy/clipfrac_avg"] == 0.0
    # the sampler's log-probs (KV cache) and the trainer's (full forward) agree to float noise
    assert last["policy/logprob_change_first_minibatch"] < 1e-2
    # ... so the rollout-correction weights π_old / π_sampler, logged though not applied, are 1 up to that noise
    assert abs(last["sampler/is_weight_mean"] - 1.0) < 1e-2 and last["sampler/is_beyond_cap_frac"] == 0.0
    first, final = saved_params(tmp_path, 1), saved_params(tmp_path)
    for k in ("kernel", "bias"):  # the value head is neither computed nor trained
        np.testing.assert_array_equal(first["policy"]["value_head"][k], final["policy"]["value_head"][k])
    assert "critic" not in final
    assert not np.allclose(first["policy"]["trunk"]["embed"], final["policy"]["trunk"]["embed"])

    # Resume: the same command in a copy of the workdir stopped after iteration 18 (its later checkpoints gone)
    # redoes iterations 19-20 as the uninterrupted run did them.
    resumed = stopped_copy(tmp_path, tmp_path.parent / f"{tmp_path.name}_resumed", 18)
    pg.train_and_evaluate(c, str(resumed))
    assert resumed_from(capsys.readouterr().out) == 18
    again = by_step(read_metrics(str(resumed)))
    assert sorted(again) == sorted(m)
    for step in (19, 20):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/kl_avg"):
            assert again[step][key] == pytest.approx(m[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize(
    "cfg, preset, extra",
    [
        (grpo_cfg, "dr_grpo_tiny", {}),
        (rloo_cfg, "tiny", {}),
        (reinforce_pp_cfg, "tiny", {}),
        (dapo_cfg, "tiny", {}),
        (gspo_cfg, "tiny", {}),
        (cispo_cfg, "tiny", {}),
        (grpo_cfg, "tiny", {"kl.placement": "reward", "kl.estimator": "k2"}),  # any estimator in either place
    ],
)
def test_every_estimator_runs_in_the_one_loop(tmp_path, cfg, preset, extra):
    c = cfg.get_config(preset)
    c.progress, c.mesh.data, c.num_steps, c.checkpoint.every = False, 8, 2, 10
    for k, v in {**REWARD, **extra}.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    out = pg.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(out["loss/policy_avg"]) and np.isfinite(out["objective/kl"])
    assert ("loss/kl_avg" in out) == (c.kl.placement == "loss")


def test_the_algorithm_configs_carry_their_papers_settings():
    g = grpo_cfg.get_config()
    assert (g.pg.advantage, g.kl.placement, g.kl.estimator, g.kl.init_coef, g.kl.kind) == (
        "grpo",
        "loss",
        "k3",
        0.04,
        "fixed",
    )
    assert (g.pg.epochs, g.pg.num_minibatches, g.pg.clip_range, g.pg.loss_aggregation) == (1, 1, 0.2, "sequence_mean")
    d = grpo_cfg.get_config("dr_grpo")
    assert (d.pg.advantage, d.pg.loss_aggregation) == ("dr_grpo", "token_sum")
    r = rloo_cfg.get_config()
    assert (r.pg.advantage, r.kl.placement, r.kl.estimator, r.rollout.samples_per_prompt) == ("rloo", "reward", "k1", 4)
    p = reinforce_pp_cfg.get_config()
    assert (p.pg.advantage, p.kl.placement, p.pg.epochs) == ("reinforce_pp", "reward", 4)
    with pytest.raises(ValueError, match="unknown preset 'grpo_huge'"):
        grpo_cfg.get_config("grpo_huge")
    a = dapo_cfg.get_config()  # DAPO §3.1-3.4, §2.3
    assert (a.pg.clip_range, a.pg.clip_range_high, a.pg.loss_aggregation, a.kl.init_coef) == (
        0.2,
        0.28,
        "token_mean",
        0,
    )
    assert a.pg.dynamic_sampling and a.pg.overlong_cache > 0 and a.rollout.samples_per_prompt == 16
    s = gspo_cfg.get_config()  # GSPO §5.1
    assert (s.pg.policy_loss, s.pg.clip_range, s.pg.clip_range_high, s.pg.num_minibatches) == ("gspo", 3e-4, 4e-4, 4)
    m = cispo_cfg.get_config()  # MiniMax-M1 eq. 4
    assert (m.pg.policy_loss, m.pg.loss_aggregation, m.kl.init_coef) == ("cispo", "token_mean", 0)


def test_the_pipeline_applies_an_algorithm_under_the_users_overrides():
    from rlhf_jax.pipeline import policy_stage_config
    from tests.test_pipeline import pipeline_config

    c = pipeline_config("default")
    c.policy = "grpo"
    s = policy_stage_config(c)
    assert (s.pg.advantage, s.kl.placement, s.rollout.samples_per_prompt) == ("grpo", "loss", 8)
    assert (s.num_steps, s.batch_size, s.optim.lr) == (80, 64, 3e-5)  # the pipeline's sizes stay
    c.pg.rollout.samples_per_prompt, c.pg.optim.lr = 4, 1e-4  # set by the user: they win
    s = policy_stage_config(c)
    assert (s.rollout.samples_per_prompt, s.optim.lr, s.kl.init_coef) == (4, 1e-4, 0.04)
    c.policy = "ppo"
    assert policy_stage_config(c).pg.advantage == "gae"
    c.policy = "trpo"
    with pytest.raises(ValueError, match="config.policy='trpo' is not an algorithm"):
        policy_stage_config(c)


TOY_CONFIG = '''"""A toy algorithm: GRPO's settings with a test's loss."""
from rlhf_jax.config import stage_config

ALGORITHMS = {"toy": dict(pg=dict(advantage="grpo", policy_loss="toy_reinforce"), rollout=dict(samples_per_prompt=4))}
LABELS = {"toy": "Toy REINFORCE"}


def get_config(preset="default"):
    return stage_config("ppo", preset, ALGORITHMS["toy"])
'''


def test_a_new_algorithm_is_a_loss_and_a_config_file(tmp_path, monkeypatch):
    """One registered loss and one config file declaring the algorithm: it is then the pipeline's choice, the
    report's label, an entry of the experiments' lists and a valid pg-stage config, nothing else edited."""
    import shutil

    import jax.numpy as jnp

    from experiments import ROOT, load_experiment
    from rlhf_jax import algorithms, config, pg_setup, rl
    from rlhf_jax.pipeline import policy_stage_config
    from tests.test_pipeline import pipeline_config

    configs = tmp_path / "configs"
    shutil.copytree(config.CONFIG_DIR, configs)
    (configs / "toy.py").write_text(TOY_CONFIG)
    monkeypatch.setattr(config, "CONFIG_DIR", str(configs))

    @rl.register_policy_loss("toy_reinforce")
    def toy(new_logprobs, old_logprobs, advantages, mask, s):
        loss = rl.aggregate(-jnp.where(mask != 0, advantages * new_logprobs, 0.0), mask, s.aggregation, s.budget)
        return loss, {"clipfrac": 0.0 * loss, "approxkl": 0.0 * loss, "ratio_mean": 1.0 + 0.0 * loss}

    try:
        c = pipeline_config("default")
        c.policy = "toy"
        s = policy_stage_config(c)
        assert (s.pg.policy_loss, s.pg.advantage, s.rollout.samples_per_prompt) == ("toy_reinforce", "grpo", 4)
        assert pg_setup.check_config(s) == 4
        assert algorithms.label("toy") == "Toy REINFORCE" and "toy" in algorithms.of_stage("pg")
        tuning = load_experiment(f"{ROOT}/experiments/algorithms_tuning.py")
        assert {r.overrides["policy"] for r in tuning.runs} >= {"toy", "ppo", "grpo", "dapo", "gspo", "cispo", "dpo"}
    finally:
        del rl.POLICY_LOSSES["toy_reinforce"]


def test_the_report_labels_and_experiment_lists_are_the_configs_algorithms():
    from rlhf_jax import algorithms

    known = algorithms.algorithms()
    assert algorithms.of_stage("pg") == ("cispo", "dapo", "grpo", "dr_grpo", "gspo", "ppo", "reinforce_pp", "rloo")
    assert algorithms.of_stage("dpo") == ("dpo", "ipo", "simpo", "plackett_luce", "online_dpo")
    assert {n: a.label for n, a in known.items() if a.file == "grpo"} == {"grpo": "GRPO", "dr_grpo": "Dr. GRPO"}
    assert algorithms.label("reinforce_pp") == "REINFORCE++" and algorithms.label("unknown") == "unknown"
