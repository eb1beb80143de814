"""configs/ppo.py:lm_human_preferences and configs/rm.py:lm_human_preferences: openai/lm-human-preferences'
settings (each cited in the config), and the two presets running end to end at the tiny scale."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.ppo as ppo_cfg
import configs.rm as rm_cfg
from rlhf_jax import optim, rewards, rl
from rlhf_jax.metrics import read_metrics
from rlhf_jax.rollout import Rollout
from rlhf_jax.stages import pg
from tests.helpers import by_step, override, tiny

# (key, value, where lm-human-preferences sets it)
PPO_SETTINGS = [
    ("pg.epochs", 4, "train_policy.py:51 noptepochs"),
    ("pg.num_minibatches", 1, "train_policy.py:50 nminibatches"),
    ("pg.clip_range", 0.2, "train_policy.py:54 cliprange"),
    ("pg.clip_range_value", 0.2, "train_policy.py:55 cliprange_value"),
    ("pg.vf_coef", 0.1, "train_policy.py:53"),
    ("pg.gamma", 1.0, "train_policy.py:56"),
    ("pg.lam", 0.95, "train_policy.py:57"),
    ("pg.whiten_rewards", True, "train_policy.py:58"),
    ("pg.whiten_advantages", True, "train_policy.py:338"),
    ("pg.entropy_coef", 0.0, "train_policy.py:357"),
    ("pg.missing_eos_penalty", -1.0, "lm_tasks.py:32 penalty_reward_value"),
    ("pg.advantage", "gae", "train_policy.py:327-336"),
    ("pg.critic", "shared", "policy.py:28"),
    ("pg.loss_aggregation", "token_mean", "train_policy.py:354"),
    ("kl.kind", "adaptive", "launch.py:130"),
    ("kl.init_coef", 0.15, "launch.py:129"),
    ("kl.target", 6.0, "launch.py:131"),
    ("kl.horizon", 10000, "train_policy.py:28"),
    ("kl.estimator", "k1", "train_policy.py:150"),
    ("kl.placement", "reward", "train_policy.py:151-153"),
    ("optim.name", "tf_adam", "utils/core.py:627"),
    ("optim.eps", 1e-5, "utils/core.py:627"),
    ("optim.grad_clip_norm", 0.0, "utils/core.py:621-629"),
    ("optim.weight_decay", 0.0, "utils/core.py:627"),
    ("optim.lr", 1e-5, "launch.py:122"),
    ("optim.schedule", "linear", "train_policy.py:172-173"),
    ("optim.final_lr_fraction", 0.0, "train_policy.py:172-173"),
    ("optim.warmup_steps", 0, "train_policy.py:172-173"),
    ("rollout.temperature", 0.7, "launch.py:17"),
    ("rollout.top_k", 0, "policy.py:100-106"),
    ("rollout.top_p", 1.0, "policy.py:100-106"),
    ("data.max_prompt_len", 64, "launch.py:9 query_length"),
    ("reward.kind", "rm", "launch.py:133"),
]
RM_SETTINGS = [
    ("rm.loss", "best_of_k", "launch.py:51 best_of_4"),
    ("rm.normalize_on", "policy_samples", "launch.py:53, train_reward.py:191-199"),
    ("rm.normalize_before", True, "launch.py:52"),
    ("rm.normalize_samples", 256, "launch.py:54"),
    ("rollout.temperature", 0.7, "launch.py:17"),
    ("batch_size", 32, "launch.py:61"),
    ("optim.name", "tf_adam", "utils/core.py:627"),
    ("optim.eps", 1e-5, "utils/core.py:627"),
    ("optim.grad_clip_norm", 0.0, "utils/core.py:621-629"),
    ("optim.lr", 5e-5, "launch.py:62"),
    ("optim.schedule", "linear", "train_reward.py:249"),
    ("optim.final_lr_fraction", 0.0, "train_reward.py:249"),
    ("optim.warmup_steps", 0, "train_reward.py:249"),
    ("num_steps", 2000 // 32, "train_reward.py:245: one epoch"),
]


def get(c, key):
    for part in key.split("."):
        c = c[part]
    return c


@pytest.mark.parametrize("key,value,source", PPO_SETTINGS, ids=[k for k, *_ in PPO_SETTINGS])
def test_ppo_preset_has_the_cited_setting(key, value, source):
    assert get(ppo_cfg.get_config("lm_human_preferences"), key) == value, source


@pytest.mark.parametrize("key,value,source", RM_SETTINGS, ids=[k for k, *_ in RM_SETTINGS])
def test_rm_preset_has_the_cited_setting(key, value, source):
    assert get(rm_cfg.get_config("lm_human_preferences"), key) == value, source


def test_presets_keep_the_default_scale_and_share_the_sampling():
    d, p = ppo_cfg.get_config(), ppo_cfg.get_config("lm_human_preferences")
    r = rm_cfg.get_config("lm_human_preferences")
    assert (p.batch_size, p.num_steps, p.model.to_dict()) == (d.batch_size, d.num_steps, d.model.to_dict())
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "stop_token", "eos_after"):
        assert r.rollout[key] == p.rollout[key], key  # the RM is normalised on what PPO will sample
    assert r.data.max_prompt_len == p.data.max_prompt_len


def test_no_gradient_clipping_in_the_preset_optimizer():
    # TF Adam's first step is lr·a/(a + eps) per entry, a = sqrt(1 − b2)·|g|: the raw g = [1000, 1e-5] moves
    # the small entry by ~0.03·lr; clipped to norm 1 first (g ≈ [1, 1e-8]) it would move by ~3e-5·lr.
    c = ppo_cfg.get_config("lm_human_preferences").optim
    tx, _ = optim.make_optimizer(c, 10)
    params, g = {"w": jnp.zeros(2)}, np.array([1000.0, 1e-5])
    updates, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params), params)
    a = np.sqrt(1 - c.b2) * g
    np.testing.assert_allclose(np.asarray(updates["w"]) / -c.lr, a / (a + c.eps), rtol=1e-3)


def test_preset_whitens_rewards_and_penalises_a_response_without_the_stop_token():
    c = ppo_cfg.get_config("lm_human_preferences")
    B, T = 8, 6
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    mask = (jnp.arange(T)[None] < jnp.array([6, 5, 4, 6, 3, 6, 2, 6])[:, None]).astype(jnp.int32)
    ended = jnp.array([True, True, False, True, True, False, True, True])
    logprobs = -jax.random.uniform(k[0], (B, T))
    scored = Rollout(
        None,
        None,
        None,
        mask,
        ended,
        logprobs,
        logprobs=logprobs,
        ref_logprobs=-jax.random.uniform(k[1], (B, T)),
        values=jax.random.normal(k[2], (B, T)),
        reward=rewards.Scores(3.0 + jax.random.normal(k[3], (B,))),
    )
    out = pg.make_advantage_fn(c, 1)(scored, 0.15)
    np.testing.assert_allclose(np.asarray(out.scores)[~np.asarray(ended)], -1.0)  # penalty_reward_value
    r = np.asarray(out.rewards)[np.asarray(mask) > 0]
    assert r.std() == pytest.approx(1.0, abs=1e-4)  # whitened, mean kept (shift_mean=False)
    unwhitened, _, _ = rl.compute_rewards(out.scores, scored.logprobs, scored.ref_logprobs, mask, 0.15)
    assert r.mean() == pytest.approx(float(np.asarray(unwhitened)[np.asarray(mask) > 0].mean()), abs=1e-5)


def tiny_lmhp(cfg_module, **overrides):
    """The lm_human_preferences preset at the tests' tiny sizes (tests/helpers.py:tiny's)."""
    base = tiny(cfg_module)
    c = cfg_module.get_config("lm_human_preferences")
    c.progress, c.mesh.data = False, 8
    c.model.update(base.model.to_dict())
    c.data.vocab_size = base.data.vocab_size
    c.data.max_prompt_len, c.rollout.max_new_tokens = 48, 12  # + 12 fits max_len 64
    c.batch_size, c.checkpoint.every = 8, 100
    return override(c, **overrides)


@pytest.mark.slow
def test_lmhp_rm_then_two_ppo_iterations_at_the_tiny_scale(tmp_path):
    import configs.pretrain as pretrain_cfg
    from rlhf_jax import preference
    from rlhf_jax.run import Run
    from rlhf_jax.stages import lm, rm
    from rlhf_jax.trained import load_reward_model

    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=5), str(tmp_path / "pt"))
    rc = tiny_lmhp(
        rm_cfg,
        init_from=str(tmp_path / "pt"),
        num_steps=6,
        eval_every=6,
        eval_batches=2,
        **{"data.seq_len": 48, "data.builtin_examples": 48, "rm.normalize_samples": 16},
    )
    rm_out = rm.train_and_evaluate(rc, str(tmp_path / "rm"))
    assert np.isfinite(rm_out["rm/loss"])
    norm = json.loads((tmp_path / "rm" / "reward_norm.json").read_text())
    assert norm["reference"] == "policy_samples" and norm["num_rewards"] == 16

    # The normalised rewards of the policy samples it was computed on have mean 0 / std 1.
    run = Run(rc, str(tmp_path / "rm_check"))
    model, params, norm = load_reward_model(str(tmp_path / "rm"), run.mesh, run.rules)
    sample_rewards = rm.policy_sample_rewards_fn(run, model)
    raw = sample_rewards(params, 1)  # draw 1: the samples after training
    z = np.asarray(preference.apply_normalization(raw, norm["gain"], norm["bias"]))
    assert z.mean() == pytest.approx(0.0, abs=1e-3) and z.std() == pytest.approx(1.0, abs=1e-3)
    fresh = np.asarray(preference.apply_normalization(sample_rewards(params, 2), norm["gain"], norm["bias"]))
    assert not np.allclose(fresh, z)  # another draw: other samples

    pc = tiny_lmhp(
        ppo_cfg,
        init_from=str(tmp_path / "pt"),
        num_steps=2,
        sample_every=0,
        **{"reward.rm_workdir": str(tmp_path / "rm")},
    )
    out = pg.train_and_evaluate(pc, str(tmp_path / "ppo"))
    m = by_step(read_metrics(str(tmp_path / "ppo")))
    for key in ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "policy/grad_norm", "kl_coef"):
        assert np.isfinite(m[2][key]), key
    assert m[1]["kl_coef"] == pytest.approx(0.15) and m[2]["kl_coef"] != pytest.approx(0.15)  # adaptive β
    # one minibatch per epoch: 4 updates per iteration, the lr annealed linearly to 0 over 2 × 4 of them
    assert m[2]["lr"] == pytest.approx(pc.optim.lr * (1 - 4 / 8))
    assert np.isfinite(out["objective/rlhf_reward"])
