"""PPO mathematics vs plain-loop float64 references on small random cases with ragged masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import forward, rl

B, T = 5, 7


def ragged_mask(lengths=(7, 3, 1, 5, 0), T=T):
    """Prefix masks: row i has lengths[i] real tokens (the last row none at all)."""
    return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def entries(x, mask):
    return np.asarray(x, np.float64)[np.asarray(mask) != 0]


# --- masked statistics -------------------------------------------------------------------------------------------


def test_masked_mean_and_var_use_only_real_entries():
    x, mask = rand(B, T), ragged_mask()
    real = entries(x, mask)
    np.testing.assert_allclose(rl.masked_mean(x, mask), real.mean(), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, mask), real.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(rl.masked_var(x, mask, unbiased=False), real.var(), rtol=1e-5)
    per_row = rl.masked_mean(x, mask, axis=1)
    for i in range(B):
        expect = x[i, mask[i] != 0].mean() if mask[i].any() else 0.0  # empty row: 0, not NaN
        np.testing.assert_allclose(per_row[i], expect, rtol=1e-5, atol=1e-7)
    assert float(rl.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_whiten_gives_zero_mean_unit_std_on_real_entries():
    x, mask = rand(B, T, seed=1, scale=3.0) + 2.0, ragged_mask()
    w = np.asarray(rl.masked_whiten(x, mask))
    real = entries(w, mask)
    np.testing.assert_allclose(real.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(real.std(), 1.0, rtol=1e-4)  # biased std, as tf.nn.moments
    assert np.all(w[mask == 0] == 0)
    # Reference: lm-human-preferences `whiten` applied to the real entries alone.
    xr = entries(x, mask)
    np.testing.assert_allclose(real, (xr - xr.mean()) / np.sqrt(xr.var() + 1e-8), rtol=1e-4, atol=1e-5)


def test_whiten_without_shift_keeps_the_mean():
    x, mask = rand(B, T, seed=2, scale=2.0) + 5.0, ragged_mask()
    w = rl.masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(entries(w, mask).mean(), entries(x, mask).mean(), rtol=1e-5)
    np.testing.assert_allclose(entries(w, mask).std(), 1.0, rtol=1e-4)


# --- log-probs, entropy and KL -----------------------------------------------------------------------------------


def test_logprobs_and_entropy_follow_the_tempered_softmax():
    V, temp = 11, 0.7
    logits = rand(B, T, V, seed=3, scale=2.0)
    tokens = np.random.default_rng(4).integers(0, V, (B, T))
    lp = np.asarray(forward.logprobs_from_logits(jnp.asarray(logits, jnp.bfloat16), tokens, temp))
    ent = np.asarray(forward.entropy_from_logits(logits, temp))
    assert lp.dtype == np.float32
    scaled = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64) / temp
    for b in range(B):
        for t in range(T):
            z = scaled[b, t] - scaled[b, t].max()
            logp = z - math.log(np.exp(z).sum())
            np.testing.assert_allclose(lp[b, t], logp[tokens[b, t]], rtol=1e-4, atol=1e-5)
    s = logits.astype(np.float64) / temp
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-5)


def test_k1_and_k3_are_unbiased_kl_estimators_and_k3_is_nonnegative():
    # Sum over every token x weighted by p(x): E_p[k1] = E_p[k3] = KL(p‖q) exactly.
    V = 6
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(rand(V, seed=5))), np.float64)
    logq = np.asarray(jax.nn.log_softmax(jnp.asarray(rand(V, seed=6))), np.float64)
    kl = float(np.sum(np.exp(logp) * (logp - logq)))
    for kind in ("k1", "k3"):
        est = np.asarray(
            rl.kl_penalty(jnp.asarray(logp[None], jnp.float32), jnp.asarray(logq[None], jnp.float32), kind), np.float64
        )[0]
        np.testing.assert_allclose(np.sum(np.exp(logp) * est), kl, rtol=1e-4)
    k3 = np.asarray(rl.kl_penalty(rand(B, T, seed=7, scale=3.0), rand(B, T, seed=8, scale=3.0), "k3"))
    assert np.all(k3 >= 0)


def test_k3_is_about_half_k1_squared_for_close_policies():
    lp = rand(B, T, seed=9)
    delta = rand(B, T, seed=10, scale=0.01)
    k1 = np.asarray(rl.kl_penalty(lp + delta, lp, "k1"), np.float64)
    k3 = np.asarray(rl.kl_penalty(lp + delta, lp, "k3"), np.float64)
    np.testing.assert_allclose(k1, delta, atol=1e-6)
    # k3 = e^{−k1} − 1 + k1 = k1²/2 − k1³/6 + ...: a second-order quantity, unlike k1.
    assert np.all(np.abs(k3 - k1**2 / 2) <= np.abs(k1) ** 3 / 6 + 2e-7)
    assert np.all(rl.kl_penalty(lp, lp, "k3") == 0)
    k2 = np.asarray(rl.kl_penalty(lp + delta, lp, "k2"), np.float64)
    np.testing.assert_allclose(k2, 0.5 * k1**2, rtol=1e-5, atol=1e-12)  # k2 = ½ (log r)²
    with pytest.raises(ValueError, match="one of"):
        rl.kl_penalty(lp, lp, "k4")


# --- rewards and GAE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_rewards_are_kl_penalty_per_token_plus_score_at_the_last_real_token(kind):
    lengths = (7, 3, 1, 5, 0)
    mask, lp, ref = ragged_mask(lengths), rand(B, T, seed=11), rand(B, T, seed=12)
    scores, beta = rand(B, seed=13), 0.15
    rewards, kl, nsr = jax.jit(rl.compute_rewards, static_argnames="kl_kind")(
        scores, lp, ref, mask, jnp.float32(beta), kl_kind=kind
    )
    for b in range(B):
        for t in range(T):
            d = float(lp[b, t]) - float(ref[b, t])
            k = d if kind == "k1" else math.exp(-d) - 1 + d
            k = k if t < lengths[b] else 0.0
            r = -beta * k + (float(scores[b]) if t == lengths[b] - 1 else 0.0)
            np.testing.assert_allclose(kl[b, t], k, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(nsr[b, t], -beta * k, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(rewards[b, t], r, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(rewards)[-1] == 0)  # no real token: the score is dropped, nothing is NaN


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain reverse loop per episode; the episode ends after its last real token."""
    adv = np.zeros(rewards.shape, np.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, adv + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_equals_a_plain_reverse_loop(gamma, lam):
    lengths = (7, 3, 1, 5, 0)
    rewards, values, mask = rand(B, T, seed=14), rand(B, T, seed=15), ragged_mask(lengths)
    adv, ret = jax.jit(rl.gae)(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_with_full_mask_is_lm_human_preferences_loop():
    # lm-human-preferences has no mask: nextvalues = values[:, t+1] if t < T-1 else 0.
    rewards, values = rand(B, T, seed=16), rand(B, T, seed=17)
    adv, _ = rl.gae(rewards, values, np.ones((B, T), np.float32), 1.0, 0.95)
    last, out = 0.0, []
    for t in reversed(range(T)):
        nxt = values[:, t + 1].astype(np.float64) if t < T - 1 else 0.0
        last = rewards[:, t] + nxt - values[:, t] + 0.95 * last
        out.append(last)
    np.testing.assert_allclose(adv, np.stack(out[::-1], axis=1), rtol=1e-5, atol=1e-5)


# --- losses ------------------------------------------------------------------------------------------------------


def reference_policy_loss(new, old, adv, mask, eps):
    losses, clipped_count, sq, ratios = [], 0, [], []
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if mask[b, t] == 0:
                continue
            d = float(new[b, t]) - float(old[b, t])
            ratio, a = math.exp(d), float(adv[b, t])
            l1, l2 = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(l1, l2))
            clipped_count += l2 > l1
            sq.append(d * d)
            ratios.append(ratio)
    n = len(losses)
    return sum(losses) / n, {
        "clipfrac": clipped_count / n,
        "approxkl": 0.5 * sum(sq) / n,
        "ratio_mean": sum(ratios) / n,
    }


def test_policy_loss_matches_reference_on_random_data():
    mask = ragged_mask()
    new, old = rand(B, T, seed=18, scale=0.3), rand(B, T, seed=19, scale=0.3)
    adv = rand(B, T, seed=20)
    loss, stats = jax.jit(rl.policy_loss)(new, old, adv, mask, 0.2)
    ref_loss, ref_stats = reference_policy_loss(new, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k, v in ref_stats.items():
        np.testing.assert_allclose(stats[k], v, rtol=1e-5, err_msg=k)
    assert 0 < ref_stats["clipfrac"] < 1  # the random case exercises both branches


def test_policy_clipping_for_positive_and_negative_advantages():
    # ratio 1.5, A>0: clipped (1.2) is the larger loss; ratio 0.5, A<0: clipped (0.8) is larger;
    # ratio 1.5, A<0 and ratio 0.5, A>0: the unclipped term is larger (pessimistic bound keeps it).
    r = np.log(np.array([[1.5, 0.5, 1.5, 0.5]], np.float32))
    adv = np.array([[2.0, -1.0, -1.0, 3.0]], np.float32)
    loss, stats = rl.policy_loss(r, np.zeros_like(r), adv, np.ones_like(r), 0.2)
    expected = np.mean([-2.0 * 1.2, 1.0 * 0.8, 1.0 * 1.5, -3.0 * 0.5])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(stats["clipfrac"], 0.5)
    # Clipped tokens carry no gradient; the unclipped ones do.
    g = jax.grad(lambda n: rl.policy_loss(n, jnp.zeros_like(n), adv, jnp.ones_like(n), 0.2)[0])(jnp.asarray(r))
    assert np.all(np.asarray(g)[0, :2] == 0) and np.all(np.asarray(g)[0, 2:] != 0)


def test_value_loss_matches_reference():
    mask = ragged_mask()
    new, old, ret = rand(B, T, seed=21), rand(B, T, seed=22), rand(B, T, seed=23)
    c = 0.2
    loss, stats = jax.jit(rl.value_loss)(new, old, ret, mask, c)
    terms, clipped_count, vp = [], 0, []
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            v, vo, R = float(new[b, t]), float(old[b, t]), float(ret[b, t])
            l1, l2 = (v - R) ** 2, (min(max(v, vo - c), vo + c) - R) ** 2
            terms.append(max(l1, l2))
            clipped_count += l2 > l1
            vp.append(v)
    np.testing.assert_allclose(loss, 0.5 * np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(stats["clipfrac"], clipped_count / len(terms), rtol=1e-6)
    np.testing.assert_allclose(stats["vpred_mean"], np.mean(vp), rtol=1e-5)
    assert 0 < stats["clipfrac"] < 1


def test_masked_positions_never_contribute_to_losses_or_gradients():
    mask = ragged_mask()
    keys = ("new", "old", "adv", "vnew", "vold", "ret", "rew", "scores_lp")
    base = {k: rand(B, T, seed=30 + i) for i, k in enumerate(keys)}
    fill = (np.inf, -np.inf, np.nan, 1e30, -1e30, np.nan, np.nan, 1e4)
    junk = {k: np.where(mask == 0, np.float32(f), base[k]) for k, f in zip(keys, fill)}

    def everything(d):
        pg, pgs = rl.policy_loss(d["new"], d["old"], d["adv"], mask, 0.2)
        vf, vfs = rl.value_loss(d["vnew"], d["vold"], d["ret"], mask, 0.2)
        adv, _ = rl.gae(d["rew"], d["vold"], mask, 1.0, 0.95)
        rewards, kl, _ = rl.compute_rewards(jnp.ones(B), d["new"], d["scores_lp"], mask, 0.1, "k3")
        w = rl.masked_whiten(d["rew"], mask)
        return {
            "pg": pg,
            "vf": vf,
            **{f"pg_{k}": v for k, v in pgs.items()},
            **{f"vf_{k}": v for k, v in vfs.items()},
            "adv": adv,
            "rewards": rewards,
            "kl": kl,
            "whiten": w,
        }

    clean, dirty = jax.jit(everything)(base), jax.jit(everything)(junk)
    for k in clean:
        np.testing.assert_array_equal(np.asarray(clean[k]), np.asarray(dirty[k]), err_msg=k)

    def total(new, vnew):
        return (
            rl.policy_loss(new, junk["old"], junk["adv"], mask, 0.2)[0]
            + rl.value_loss(vnew, junk["vold"], junk["ret"], mask, 0.2)[0]
        )

    grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(junk["new"]), jnp.asarray(junk["vnew"]))
    for g in grads:
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[mask == 0] == 0)


# --- KL controller -----------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_the_formula_and_clips_the_error():
    target, horizon, n = 6.0, 10000, 512
    state = rl.kl_controller_init(0.15)
    assert state["kl_coef"].shape == () and state["kl_coef"].dtype == jnp.float32
    update = jax.jit(rl.kl_controller_update, static_argnames=("kind", "target", "horizon"))
    beta = 0.15
    for kl in (6.6, 3.0, 50.0, 0.0, 6.0, 5.1):
        state = update(state, jnp.float32(kl), n, kind="adaptive", target=target, horizon=horizon)
        error = min(max(kl / target - 1, -0.2), 0.2)
        beta *= 1 + error * n / horizon
        np.testing.assert_allclose(state["kl_coef"], beta, rtol=1e-6)
    # The ±0.2 clip: KL far above or below target moves β by exactly ±0.2·n/horizon.
    up = rl.kl_controller_update({"kl_coef": jnp.float32(1.0)}, 1000.0, n, "adaptive", target, horizon)
    down = rl.kl_controller_update({"kl_coef": jnp.float32(1.0)}, 0.0, n, "adaptive", target, horizon)
    np.testing.assert_allclose(up["kl_coef"], 1 + 0.2 * n / horizon, rtol=1e-6)
    np.testing.assert_allclose(down["kl_coef"], 1 - 0.2 * n / horizon, rtol=1e-6)


def test_fixed_kl_controller_keeps_beta():
    state = rl.kl_controller_update(rl.kl_controller_init(0.2), 100.0, 64, "fixed", 6.0, 10000)
    np.testing.assert_allclose(state["kl_coef"], 0.2, rtol=1e-7)
    with pytest.raises(ValueError, match="target"):
        rl.kl_controller_update(state, 1.0, 64, "adaptive", None, 10000)


# --- response boundaries -----------------------------------------------------------------------------------------

EOS, PAD = 2, 0


def test_response_mask_includes_the_first_eos_and_nothing_after():
    tokens = np.array([[5, 6, EOS, 7, EOS], [EOS, 5, 5, 5, 5], [5, 6, 7, 8, 9]])
    expect = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(jax.jit(rl.response_mask_from_eos, static_argnums=1)(tokens, EOS), expect)
    np.testing.assert_array_equal(rl.first_true_index(jnp.asarray(tokens == EOS)), [2, 0, 5])


def test_truncation_after_the_first_stop_token_at_or_after_truncate_after():
    tokens = np.array(
        [
            [5, EOS, 6, EOS, 7, 8],  # the EOS at 1 is too early; cut after the one at 3
            [5, 6, 7, 8, EOS, EOS],  # cut after index 4 (the second EOS becomes pad)
            [EOS, 5, 6, 7, 8, 9],
        ]
    )  # no EOS at index >= 2: unchanged, not found
    out, found = jax.jit(rl.truncate_after_stop_token, static_argnums=(1, 2, 3))(tokens, EOS, 2, PAD)
    np.testing.assert_array_equal(out, [[5, EOS, 6, EOS, PAD, PAD], [5, 6, 7, 8, EOS, PAD], [EOS, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(found, [True, True, False])


def test_leave_one_out_scores_subtract_the_mean_of_the_other_samples_of_the_prompt():
    scores = jnp.asarray([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three samples each
    want = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]  # by hand: s_i − mean of the other two
    np.testing.assert_allclose(rl.leave_one_out_scores(scores, 3), want, rtol=1e-6)
    np.testing.assert_allclose(rl.leave_one_out_scores(scores, 3).reshape(2, 3).sum(1), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="group=4 must be >= 2 and divide the 6 scores"):
        rl.leave_one_out_scores(scores, 4)


def test_bucket_width_pads_to_the_smallest_octave_or_half_octave_of_the_bucket_within_the_cap():
    from rlhf_jax.rollout import bucket_width

    longest = (1, 16, 17, 24, 25, 32, 33, 48, 49, 64)
    assert [bucket_width(n, 64, 16) for n in longest] == [16, 16, 32, 32, 32, 32, 64, 64, 64, 64]  # octaves
    halves = [bucket_width(n, 64, 16, half_octaves=True) for n in longest]
    assert halves == [16, 16, 24, 24, 32, 32, 48, 48, 64, 64]
    assert [bucket_width(n, 1000, 16, half_octaves=True) for n in (65, 97, 129)] == [96, 128, 192]
    assert bucket_width(40, 44, 16) == 44  # capped at the limit
    assert bucket_width(3, 48, 0) == 48  # 0: always the limit


def test_token_sum_divides_by_the_response_budget_not_the_width_it_was_cut_to():
    x = jnp.ones((2, 8))
    mask = jnp.asarray([[1] * 3 + [0] * 5, [1] * 8])
    assert float(rl.aggregate(x, mask, "token_sum")) == pytest.approx(11 / 16)
    assert float(rl.aggregate(x, mask, "token_sum", budget=32)) == pytest.approx(11 / 64)
    assert float(rl.aggregate(x[:, :4], mask[:, :4], "token_sum", budget=32)) == pytest.approx(7 / 64)


# --- the policy-loss registry ------------------------------------------------------------------------------------


def _tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _with_nan_in_masked_slots(x, mask):
    return np.where(np.asarray(mask) != 0, x, np.nan).astype(np.float32)


def _inputs(seed):
    mask = ragged_mask()
    new = _with_nan_in_masked_slots(rand(B, T, seed=seed, scale=0.4), mask)
    old = _with_nan_in_masked_slots(rand(B, T, seed=seed + 1, scale=0.4), mask)
    adv = _with_nan_in_masked_slots(rand(B, T, seed=seed + 2), mask)
    return new, old, adv, mask


def test_dual_clip_matches_ye_et_al_eq_5():
    new, old, adv, mask = _inputs(40)
    adv = adv * 3.0  # large |A| so that c·A binds for some negative advantages
    # ratios past c = 3 on some negative-advantage tokens (log ρ ≥ 1.5 where A < 0): where the dual clip binds
    new = np.where(adv < 0, old + 1.5 + np.abs(new - old), new).astype(np.float32)
    s = rl.LossSettings(0.2, 0.2, 3.0)
    loss, _ = jax.jit(rl.dual_clip, static_argnums=4)(new, old, adv, mask, s)
    terms, lower_bound_binds = [], 0
    for b, t in _tokens(mask):
        r, a = math.exp(new[b, t] - old[b, t]), float(adv[b, t])
        ppo = min(r * a, min(max(r, 0.8), 1.2) * a)
        terms.append(-(max(ppo, 3.0 * a) if a < 0 else ppo))
        lower_bound_binds += a < 0 and 3.0 * a > ppo
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    assert lower_bound_binds > 0  # the case exercises the dual clip
    assert np.isfinite(float(loss))


def test_clip_higher_clips_the_ratio_asymmetrically():
    r = np.log(np.array([[1.25, 0.75]], np.float32))
    adv = np.array([[1.0, -1.0]], np.float32)
    loss, stats = rl.ppo_clip(r, np.zeros_like(r), adv, np.ones_like(r), rl.LossSettings(0.2, 0.28))
    np.testing.assert_allclose(loss, np.mean([-1.25, 0.8]), rtol=1e-6)  # 1.25 < 1 + 0.28: not clipped
    assert float(stats["clipfrac"]) == 0.5


def test_gspo_matches_zheng_et_al_sequence_ratio():
    new, old, adv, mask = _inputs(50)
    adv = np.where(np.asarray(mask) != 0, adv[:, :1], np.nan).astype(np.float32)  # one advantage per sequence
    s = rl.LossSettings(3e-4, 4e-4)
    loss, _ = jax.jit(rl.gspo, static_argnums=4)(new, old, adv, mask, s)
    terms = []
    for b in range(B):
        ts = [t for t in range(T) if mask[b, t]]
        if not ts:
            continue
        ratio = math.exp(np.mean([new[b, t] - old[b, t] for t in ts]))
        a = float(adv[b, ts[0]])
        terms.append(-min(ratio * a, min(max(ratio, 1 - 3e-4), 1 + 4e-4) * a))
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    # at ratio 1 (one update per batch) its gradient is GRPO's: ∇ mean_t log π · A per sequence
    g = jax.grad(lambda n: rl.gspo(n, jnp.asarray(new), jnp.asarray(adv), mask, s)[0])(jnp.asarray(new))
    expected = np.zeros((B, T), np.float32)
    rows = [b for b in range(B) if np.asarray(mask)[b].any()]
    for b in rows:
        ts = [t for t in range(T) if mask[b, t]]
        expected[b, ts] = -float(adv[b, ts[0]]) / len(ts) / len(rows)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-7)


def test_cispo_gradient_is_the_clipped_stop_gradient_weight_times_the_advantage():
    new, old, adv, mask = _inputs(60)
    s = rl.LossSettings(0.2, 0.28)
    g = jax.jit(jax.grad(lambda n: rl.cispo(n, jnp.asarray(old), jnp.asarray(adv), mask, s)[0]))(jnp.asarray(new))
    n = len(_tokens(mask))
    expected = np.zeros((B, T), np.float32)
    clipped = 0
    for b, t in _tokens(mask):
        r = math.exp(new[b, t] - old[b, t])
        expected[b, t] = -min(r, 1.28) * float(adv[b, t]) / n  # every token keeps its gradient, weight capped
        clipped += r > 1.28
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-7)
    assert clipped > 0 and np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)


def test_a_new_policy_loss_is_one_registered_function(tmp_path):
    """Registering a function makes it a config.pg.policy_loss choice of the pg stage: nothing else to edit."""
    import configs.grpo as grpo_cfg
    from rlhf_jax.stages import pg
    from tests.helpers import tiny

    @rl.register_policy_loss("toy_reinforce")
    def toy(new_logprobs, old_logprobs, advantages, mask, s):
        loss = rl.aggregate(-jnp.where(mask != 0, advantages * new_logprobs, 0.0), mask, s.aggregation, s.budget)
        return loss, {"clipfrac": 0.0 * loss, "approxkl": 0.0 * loss, "ratio_mean": 1.0 + 0.0 * loss}

    try:
        c = tiny(grpo_cfg, num_steps=1, **{"pg.policy_loss": "toy_reinforce"})
        c.reward.kind, c.reward.function = "function", "tests.test_pg_stage:even_token_share"
        out = pg.train_and_evaluate(c, str(tmp_path))
        assert np.isfinite(out["loss/policy_avg"])
    finally:
        del rl.POLICY_LOSSES["toy_reinforce"]
    c.pg.policy_loss = "toy_reinforce"  # unregistered again: refused, naming the registry's choices
    with pytest.raises(Exception, match="pg.policy_loss='toy_reinforce' is unknown.*ppo_clip"):
        pg.train_and_evaluate(c, str(tmp_path / "again"))


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_real_valued_returns_has_exactly_zero_advantage(kind):
    # groups of 8 (G = 8, GRPO's usual): in float32 mean([0.1] * 8) is not 0.1, so subtracting it left 7e-9,
    # which GRPO's division by std + 1e-4 had turned into an advantage of 7e-5 for identical answers
    returns = jnp.asarray([0.1] * 8 + [1 / 3] * 8 + [0.3, 0.7, 0.2, 0.9, 0.1, 0.4, 0.6, 0.8], jnp.float32)
    adv = np.asarray(rl.group_advantages(returns, 8, kind))
    assert np.all(adv[:16] == 0.0), adv[:16]
    assert np.all(adv[16:] != 0.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_correction_truncates_or_masks_the_sampler_importance_weights(level):
    new, old, _, mask = _inputs(70)
    sampler = old  # the trainer's π_old is `new` here, the sampler's log-probs `old`
    m = np.asarray(mask)
    ref = np.exp(np.where(m != 0, new - sampler, 0.0))
    if level == "sequence":
        ref = np.where(m != 0, np.prod(ref, axis=1, keepdims=True), 0.0)
    for kind, expect in (
        ("none", np.ones_like(ref)),
        ("tis", np.minimum(ref, 1.5)),
        ("mis", np.where(ref <= 1.5, ref, 0.0)),
    ):
        w, stats = rl.rollout_correction(new, sampler, mask, kind, level, 1.5)
        np.testing.assert_allclose(np.where(m != 0, np.asarray(w), 0.0), np.where(m != 0, expect, 0.0), rtol=1e-5)
        np.testing.assert_allclose(stats["is_weight_mean"], ref[m != 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(stats["is_beyond_cap_frac"], (ref[m != 0] > 1.5).mean(), rtol=1e-6)
    assert 0 < (ref[m != 0] > 1.5).mean() < 1  # the case has weights on both sides of the cap


def test_overlong_penalty_is_dapos_eq_13():
    lengths = jnp.asarray([0, 10, 12, 13, 14, 15, 16, 20])
    L_max, L_cache = 16, 4  # no penalty up to 12 tokens, then -1/4 a token, -1 at 16 and beyond
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    np.testing.assert_allclose(rl.overlong_penalty(lengths, L_max, L_cache), expected, rtol=1e-6)
    assert np.all(np.asarray(rl.overlong_penalty(lengths, L_max, 0)) == 0.0)  # off


def test_the_entropy_bonus_enters_the_gradient_only_with_a_coefficient():
    """stages/pg.pg_loss: with pg.entropy_coef 0 the entropy is a logged metric and the gradient is the
    surrogate's and KL's alone; with a coefficient c the gradient gains exactly -c·∇H (H the masked mean
    entropy of the response tokens, as logged)."""
    import configs.grpo as grpo_cfg
    from rlhf_jax.models.gpt import TransformerLM, positions_from_mask
    from rlhf_jax.models.layers import ModelConfig
    from rlhf_jax.rollout import Rollout
    from rlhf_jax.stages import pg

    model = TransformerLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_len=16, dtype="float32"))
    B, P, N = 4, 3, 5
    prompt = jax.random.randint(jax.random.PRNGKey(1), (B, P), 1, 64)
    response = jax.random.randint(jax.random.PRNGKey(2), (B, N), 1, 64)
    pmask, rmask = jnp.ones((B, P), jnp.int32), jnp.asarray(ragged_mask((5, 3, 1, 4), N), jnp.int32)
    tokens = jnp.concatenate([prompt, response], 1)
    mask = jnp.concatenate([pmask, rmask], 1)
    params = model.init(jax.random.PRNGKey(0), tokens, positions_from_mask(mask), mask)["params"]
    params = {"policy": jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))}
    mb = Rollout(
        prompt=prompt,
        prompt_mask=pmask,
        response=response,
        response_mask=rmask,
        ended=jnp.ones(B, bool),
        sampler_logprobs=-jnp.ones((B, N)),
        logprobs=-jnp.ones((B, N)),
        ref_logprobs=-1.5 * jnp.ones((B, N)),
        advantages=jnp.asarray(rand(B, N, seed=3)),
    )

    def grads(coef):
        c = grpo_cfg.get_config("tiny")
        c.pg.entropy_coef = coef
        fn = lambda p: pg.pg_loss(p, model, mb, None, 0.04, c)
        return jax.jit(jax.grad(fn, has_aux=True))(params)  # one compile, not one per op

    def entropy(p):
        stats = pg.policy_stats(p, model, mb, grpo_cfg.get_config("tiny").rollout.temperature, critic=False)
        return rl.masked_mean(stats["entropy"], rmask.astype(jnp.float32))

    (g0, stats), (g1, _) = grads(0.0), grads(0.25)
    g_entropy = jax.jit(jax.grad(entropy))(params)
    assert stats["policy/entropy_avg"] == pytest.approx(float(jax.jit(entropy)(params)), rel=1e-6)
    for a, b, h in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), jax.tree.leaves(g_entropy)):
        np.testing.assert_allclose(b, a - 0.25 * h, atol=1e-6, rtol=1e-5)
    assert max(float(jnp.max(jnp.abs(h))) for h in jax.tree.leaves(g_entropy)) > 1e-4  # the bonus is not nothing
