"""The critic-free family's pieces vs plain-loop float64 references of the published formulas: group
advantages (GRPO, Dr. GRPO, RLOO), REINFORCE++'s whitened reward-to-go, the three loss aggregations,
the KL in the loss, and score shaping; ragged masks throughout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl
from tests.test_rl import ragged_mask, rand

G = 4
LENGTHS = (7, 3, 1, 5, 0, 2, 7, 4)  # two prompts x four samples; one sample has no real token
B, T = len(LENGTHS), 7


def reference_group_advantages(returns, group, kind, eps=1e-4):
    out = []
    for start in range(0, len(returns), group):
        r = [float(x) for x in returns[start : start + group]]
        mean = sum(r) / len(r)
        for ri in r:
            if kind == "grpo":  # DeepSeekMath: (r_i − mean(r)) / std(r), sample std as TRL / verl
                std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5 if len(r) > 1 else 0.0
                out.append((ri - mean) / (std + eps))
            elif kind == "dr_grpo":  # Liu et al. 2025: r_i − mean(r)
                out.append(ri - mean)
            else:  # RLOO: r_i − mean of the other k − 1
                out.append(ri - (sum(r) - ri) / (len(r) - 1))
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_the_published_formulas(kind):
    mask = ragged_mask(LENGTHS)
    rewards = rand(B, T, seed=1)
    adv, returns = jax.jit(rl.advantages, static_argnames=("kind", "group"))(kind, rewards, mask, group=G)
    assert returns is None  # no critic to fit
    episode_return = (rewards.astype(np.float64) * mask).sum(1)  # R_i = Σ_t r_t over real tokens
    want = reference_group_advantages(episode_return, G, kind)
    adv = np.asarray(adv)
    for b in range(B):  # the same advantage on every real token of an episode, 0 elsewhere
        np.testing.assert_allclose(adv[b, mask[b] != 0], want[b], rtol=1e-5, atol=1e-6)
        assert np.all(adv[b, mask[b] == 0] == 0)


def test_group_advantages_sum_to_zero_within_a_group_for_the_mean_baselines():
    returns = jnp.asarray(rand(B, seed=2))
    for kind in ("dr_grpo", "rloo", "grpo"):
        a = np.asarray(rl.group_advantages(returns, G, kind)).reshape(-1, G)
        np.testing.assert_allclose(a.sum(1), 0.0, atol=1e-5)


def test_grpo_with_one_sample_or_identical_rewards_gives_zero_advantage_without_nan():
    returns = jnp.asarray(rand(B, seed=3))
    for kind in ("grpo", "dr_grpo"):
        one = np.asarray(rl.group_advantages(returns, 1, kind))
        assert np.all(one == 0) and np.all(np.isfinite(one))
        same = np.asarray(rl.group_advantages(jnp.full((B,), 0.7), G, kind))
        assert np.all(same == 0) and np.all(np.isfinite(same))
    with pytest.raises(ValueError, match="group=1 must be >= 2"):
        rl.group_advantages(returns, 1, "rloo")
    with pytest.raises(ValueError, match="group=3 does not divide the 8 episodes"):
        rl.group_advantages(returns, 3, "grpo")


def test_grpo_is_invariant_to_the_scale_of_the_reward_and_dr_grpo_is_not():
    returns = jnp.asarray(rand(B, seed=4))
    grpo = [np.asarray(rl.group_advantages(returns * s, G, "grpo")) for s in (1.0, 10.0)]
    dr = [np.asarray(rl.group_advantages(returns * s, G, "dr_grpo")) for s in (1.0, 10.0)]
    np.testing.assert_allclose(grpo[0], grpo[1], rtol=1e-3)  # up to eps
    np.testing.assert_allclose(dr[1], 10.0 * dr[0], rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_is_the_reward_to_go_whitened_over_the_whole_batch(gamma):
    mask = ragged_mask(LENGTHS)
    rewards = rand(B, T, seed=5)
    adv, returns = rl.advantages("reinforce_pp", jnp.asarray(rewards), jnp.asarray(mask), gamma=gamma)
    assert returns is None
    to_go = np.zeros((B, T))
    for b in range(B):  # G_t = Σ_{s ≥ t} γ^{s−t} r_s over the episode's real tokens
        acc = 0.0
        for t in reversed(range(LENGTHS[b])):
            acc = float(rewards[b, t]) + gamma * acc
            to_go[b, t] = acc
    real = to_go[mask != 0]
    want = (to_go - real.mean()) / np.sqrt(real.var() + 1e-8)  # one mean / std for the whole batch
    adv = np.asarray(adv)
    np.testing.assert_allclose(adv[mask != 0], want[mask != 0], rtol=1e-4, atol=1e-5)
    assert np.all(adv[mask == 0] == 0)


def test_gae_still_needs_the_critic_and_unknown_estimators_are_named():
    mask, rewards = ragged_mask(LENGTHS), rand(B, T, seed=6)
    with pytest.raises(ValueError, match="needs the critic's values"):
        rl.advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="pg.advantage='vtrace' is unknown"):
        rl.advantages("vtrace", rewards, mask)


# --- loss aggregation --------------------------------------------------------------------------------------------


def reference_aggregate(x, mask, how):
    rows = [[float(x[b, t]) for t in range(T) if mask[b, t]] for b in range(B)]
    if how == "token_mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if how == "sequence_mean":  # GRPO: 1/G Σ_i 1/|o_i| Σ_t, over episodes that have a token
        per = [sum(r) / len(r) for r in rows if r]
        return sum(per) / len(per)
    return sum(v for r in rows for v in r) / (B * T)  # Dr. GRPO: a constant normaliser


@pytest.mark.parametrize("how", rl.AGGREGATIONS)
def test_aggregations_match_their_definitions_and_ignore_masked_tokens(how):
    mask = ragged_mask(LENGTHS)
    x = rand(B, T, seed=7)
    np.testing.assert_allclose(rl.aggregate(x, mask, how), reference_aggregate(x, mask, how), rtol=1e-5)
    junk = np.where(mask == 0, np.float32(np.nan), x)
    assert float(rl.aggregate(junk, mask, how)) == pytest.approx(float(rl.aggregate(x, mask, how)), rel=1e-6)
    g = jax.grad(lambda v: rl.aggregate(v, mask, how))(jnp.asarray(junk))
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="loss_aggregation='mean' is unknown"):
        rl.aggregate(x, mask, "mean")


def test_sequence_mean_weighs_each_episode_equally_and_token_sum_weighs_each_token_equally():
    # One long and one short episode with per-token losses 1 and 3.
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    x = np.array([[1, 1, 1, 1], [3, 0, 0, 0]], np.float32)
    assert float(rl.aggregate(x, mask, "token_mean")) == pytest.approx(7 / 5)
    assert float(rl.aggregate(x, mask, "sequence_mean")) == pytest.approx((1 + 3) / 2)
    assert float(rl.aggregate(x, mask, "token_sum")) == pytest.approx(7 / 8)


@pytest.mark.parametrize("how", rl.AGGREGATIONS)
def test_policy_loss_reduces_the_clipped_surrogate_by_the_aggregation(how):
    mask = ragged_mask(LENGTHS)
    new, old, adv = rand(B, T, seed=8, scale=0.3), rand(B, T, seed=9, scale=0.3), rand(B, T, seed=10)
    loss, _ = rl.policy_loss(new, old, adv, mask, 0.2, how)
    ratio = np.exp(new.astype(np.float64) - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(loss, reference_aggregate(per_token, mask, how), rtol=1e-5)


# --- the KL in the loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", rl.KL_ESTIMATORS)
def test_kl_loss_is_the_aggregated_estimator_and_its_gradient_flows_through_the_policy_only(kind):
    mask = ragged_mask(LENGTHS)
    new, ref = rand(B, T, seed=11, scale=0.5), rand(B, T, seed=12, scale=0.5)
    d = ref.astype(np.float64) - new  # log r
    per_token = {"k1": -d, "k2": 0.5 * d**2, "k3": np.expm1(d) - d}[kind]
    got = rl.kl_loss(new, ref, mask, kind, "sequence_mean")
    np.testing.assert_allclose(got, reference_aggregate(per_token, mask, "sequence_mean"), rtol=1e-5)
    # garbage in masked positions (of either input) changes nothing, and the gradient there is exactly 0
    junk_new = np.where(mask == 0, np.float32(1e4), new)
    junk_ref = np.where(mask == 0, np.float32(-np.inf), ref)
    g_new, g_ref = jax.grad(lambda a, b: rl.kl_loss(a, b, mask, kind), argnums=(0, 1))(
        jnp.asarray(junk_new), jnp.asarray(junk_ref)
    )
    assert np.all(np.isfinite(g_new)) and np.all(np.asarray(g_new)[mask == 0] == 0)
    assert np.all(np.asarray(g_ref) == 0)  # the reference is frozen
    # d/d log π of k3 = 1 − π_ref/π: the k3 term pulls log π toward log π_ref
    if kind == "k3":
        n = reference_aggregate(np.ones((B, T)), mask, "token_mean") * mask.sum()
        want = (1.0 - np.exp(d)) / n
        np.testing.assert_allclose(np.asarray(g_new)[mask != 0], want[mask != 0], rtol=1e-4)


# --- score shaping -----------------------------------------------------------------------------------------------


def test_shape_scores_applies_the_missing_eos_penalty_then_the_clip_then_the_baseline():
    raw = jnp.asarray([4.0, -0.5, 1.0, 9.0])
    ended = jnp.asarray([True, True, False, True])
    scores, shaped = jax.jit(rl.shape_scores, static_argnums=(2, 3, 4, 5))(raw, ended, -1.0, 2.0, "loo", 2)
    np.testing.assert_allclose(scores, [2.0, -0.5, -1.0, 2.0])  # penalty (no stop token), then clip to ±2
    np.testing.assert_allclose(shaped, [2.0 + 0.5, -0.5 - 2.0, -1.0 - 2.0, 2.0 + 1.0])  # minus the other sample
    same, same_shaped = rl.shape_scores(raw, ended)
    np.testing.assert_array_equal(same, raw)  # every step off by default
    np.testing.assert_array_equal(same_shaped, raw)
    with pytest.raises(ValueError, match="score_baseline='mean'"):
        rl.shape_scores(raw, ended, baseline="mean")
