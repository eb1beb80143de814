"""PPO for language models, as lm-human-preferences does it, over masked [B, T] arrays.

B episodes (one prompt + one sampled response each), T response tokens.
`mask` [B, T] is 1 on real response tokens and 0 after the stop token / on
padding. Every function is pure jnp and jittable; masked positions never reach
a result, even if they hold inf or NaN (inputs are `where`-ed before use, so
gradients stay finite too).

Units: log-probs, KL and entropy in nats per token; scores in reward units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


# --- masked statistics -------------------------------------------------------------------------------------------

def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of `x` over entries where mask != 0 (0 where the mask is empty, never NaN)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of `x` over all masked-in entries (f32[]); `unbiased` applies Bessel's n/(n−1)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(jnp.where(mask != 0, x - mean, 0.0)), mask)
    if unbiased:
        n = jnp.sum(mask.astype(jnp.float32))
        var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x − mean) / std over masked-in entries; shift_mean=False adds the mean back.

    As lm-human-preferences `whiten`: biased variance (tf.nn.moments) and
    rsqrt(var + 1e-8). Masked-out entries come back as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0.0)


# --- log-probabilities and KL ------------------------------------------------------------------------------------

def logprobs_from_logits(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
    """log p(tokens) [B, T] in nats under softmax(logits / temperature); logits [B, T, V], computed in f32.

    The temperature is the one used for sampling, so these are the log-probs of
    the distribution the responses were actually drawn from.
    """
    logits = logits.astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy [B, T] in nats of softmax(logits / temperature); logits [B, T, V]."""
    logits = logits.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k1") -> Array:
    """Per-token estimate [B, T] of KL(π ‖ π_ref) from the sampled tokens' log-probs.

    k1 = log π − log π_ref (unbiased, can be negative; lm-human-preferences).
    k3 = (r − 1) − log r with r = π_ref / π (Schulman 2020, "Approximating KL
    divergence"): unbiased too, always ≥ 0, ≈ k1²/2 when the policies are close.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        log_r = ref_logprobs - logprobs
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"config.kl.estimator: {kind!r} is unknown. Use k1 or k3.")


def last_true_index(mask: Array) -> tuple[Array, Array]:
    """(index [B] of the last nonzero entry of each row, whether the row has any [B])."""
    T = mask.shape[1]
    nonzero = mask != 0
    last = T - 1 - jnp.argmax(nonzero[:, ::-1], axis=1)
    return last, jnp.any(nonzero, axis=1)


def compute_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, kl_coef: Array | float,
                    kl_kind: str = "k1") -> tuple[Array, Array, Array]:
    """Per-token rewards [B, T], KL [B, T] and the KL part of the reward [B, T].

    Ziegler et al. 2019 eq. 2 / InstructGPT eq. 2: R = r_θ(x, y) − β·KL, spread
    over tokens: r_t = −β·KL_t on every real token, plus the score (scores [B])
    on the row's last real token. All three are 0 on masked positions; a row
    with no real token gets no reward at all (its score is dropped: there is no
    action to credit, and GAE gives it zero advantage anyway).
    """
    kl = jnp.where(mask != 0, kl_penalty(logprobs, ref_logprobs, kl_kind), 0.0)
    non_score_reward = -kl_coef * kl
    last, any_real = last_true_index(mask)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=non_score_reward.dtype)
    score = jnp.where(any_real, scores, 0.0).astype(non_score_reward.dtype)
    rewards = non_score_reward + at_last * score[:, None]
    return rewards, kl, non_score_reward


def leave_one_out_scores(scores: Array, group: int) -> Array:
    """Scores minus the mean score of the other samples of the same prompt (RLOO's baseline: Kool et
    al. 2019; Ahmadian et al. 2024). scores [B] hold `group` consecutive samples per prompt; the result
    is unbiased (each baseline ignores its own sample) and removes the between-prompt spread of the
    score, which otherwise dominates the advantage of a small batch.

        b_i = (Σ_j s_j − s_i) / (k − 1),   s_i − b_i = k / (k − 1) · (s_i − mean_j s_j)
    """
    if group < 2 or scores.shape[0] % group:
        raise ValueError(f"leave_one_out_scores: group={group} must be >= 2 and divide the {scores.shape[0]} "
                         f"scores (rollout.samples_per_prompt must divide batch_size).")
    s = scores.reshape(-1, group)
    return ((s - s.mean(axis=1, keepdims=True)) * group / (group - 1)).reshape(scores.shape)


# --- advantages --------------------------------------------------------------------------------------------------

def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimates and returns, both [B, T] (Schulman et al. 2016, eq. 16).

        δ_t = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + γλ·A_{t+1}

    The episode ends after the last real token: V_{t+1} there is 0, as are the
    values and rewards of masked positions. Masked positions get A_t = 0 (and a
    0 inside a row cuts the recursion like an episode end). returns = A + V.
    """
    real = mask != 0
    rewards = jnp.where(real, rewards, 0.0)
    values_in = jnp.where(real, values, 0.0)
    next_values = jnp.concatenate([values_in[:, 1:], jnp.zeros_like(values_in[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values_in

    def back_one(next_adv, xs):
        delta_t, real_t = xs
        adv_t = jnp.where(real_t, delta_t + gamma * lam * next_adv, 0.0)
        return adv_t, adv_t

    # Scan runs over the leading axis: put time first and walk it backwards.
    _, adv_tb = jax.lax.scan(back_one, jnp.zeros_like(deltas[:, 0]), (deltas.T, real.T), reverse=True)
    advantages = adv_tb.T
    return advantages, advantages + values


# --- losses ------------------------------------------------------------------------------------------------------

def policy_loss(new_logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                clip_range: float) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate loss (f32[]) and stats; all inputs [B, T].

    stats: clipfrac (fraction of tokens where the clipped term is the larger
    loss), approxkl (½·mean (log π − log π_old)², as lm-human-preferences),
    ratio_mean.
    """
    real = mask != 0
    log_ratio = jnp.where(real, new_logprobs - old_logprobs, 0.0)  # 0 → ratio 1: no overflow under the mask
    advantages = jnp.where(real, advantages, 0.0)
    ratio = jnp.exp(log_ratio)
    # Schulman et al. 2017 eq. 7: L^CLIP = E[min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)], minimised as its negative.
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
             "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
             "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(new_values: Array, old_values: Array, returns: Array, mask: Array,
               clip_range_value: float) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (f32[]) and stats {clipfrac, vpred_mean}; all inputs [B, T]."""
    real = mask != 0
    new_values = jnp.where(real, new_values, 0.0)
    old_values = jnp.where(real, old_values, 0.0)
    returns = jnp.where(real, returns, 0.0)
    # Value clipping of baselines ppo2 / lm-human-preferences (Engstrom et al. 2020, "value function clipping"):
    # L^V = ½·E[max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)].
    v_clipped = jnp.clip(new_values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped = jnp.square(new_values - returns)
    clipped = jnp.square(v_clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
             "vpred_mean": masked_mean(new_values, mask)}
    return loss, stats


# --- the KL coefficient β ----------------------------------------------------------------------------------------

def kl_controller_init(init_kl_coef: float) -> dict[str, Array]:
    """Controller state {"kl_coef": f32[]}: 0-d arrays, so it lives in the train state and checkpoint."""
    return {"kl_coef": jnp.asarray(init_kl_coef, jnp.float32)}


def kl_controller_update(state: dict[str, Array], observed_kl: Array | float, n_steps: int | Array,
                         kind: str = "fixed", target: float | None = None,
                         horizon: float | None = None) -> dict[str, Array]:
    """Next controller state after a batch of `n_steps` episodes with mean summed KL `observed_kl` (nats).

    fixed: β stays. adaptive (Ziegler et al. 2019 §2.2): e = clip(KL/target − 1, ±0.2),
    β ← β·(1 + e·n_steps/horizon), a proportional controller steering KL to target.
    """
    if kind == "fixed":
        return {"kl_coef": jnp.asarray(state["kl_coef"], jnp.float32)}
    if kind != "adaptive":
        raise ValueError(f"config.kl.kind: {kind!r} is unknown. Use fixed or adaptive.")
    if target is None or horizon is None or target <= 0 or horizon <= 0:
        raise ValueError(f"config.kl: adaptive KL needs target > 0 and horizon > 0 (got target={target}, "
                         f"horizon={horizon}). Set e.g. --config.kl.target=6 --config.kl.horizon=10000.")
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    kl_coef = state["kl_coef"] * (1.0 + error * n_steps / horizon)
    return {"kl_coef": kl_coef.astype(jnp.float32)}


# --- response boundaries -----------------------------------------------------------------------------------------

def first_true_index(x: Array) -> Array:
    """Index [B] of the first True in each row of x [B, T]; T where there is none."""
    T = x.shape[1]
    return jnp.where(jnp.any(x, axis=1), jnp.argmax(x, axis=1), T)


def response_mask_from_eos(tokens: Array, eos_id: int) -> Array:
    """int32 [B, T]: 1 up to and including the first `eos_id`, 0 after (all 1 if there is none)."""
    first = first_true_index(tokens == eos_id)
    return (jnp.arange(tokens.shape[1])[None, :] <= first[:, None]).astype(jnp.int32)


def truncate_after_stop_token(tokens: Array, stop_token: int, truncate_after: int,
                              pad_id: int) -> tuple[Array, Array]:
    """lm-human-preferences' postprocessing: cut each response after its first stop token at index ≥ truncate_after.

    Returns (tokens [B, T] with everything after that stop token set to pad_id,
    found [B] bool: whether the row had one). Rows without one are left as they
    are; the caller gives them the fixed penalty score (`penalty_reward_value`).
    """
    T = tokens.shape[1]
    hits = (tokens == stop_token) & (jnp.arange(T)[None, :] >= truncate_after)
    cut = jnp.arange(T)[None, :] > first_true_index(hits)[:, None]
    return jnp.where(cut, jnp.asarray(pad_id, tokens.dtype), tokens), jnp.any(hits, axis=1)
