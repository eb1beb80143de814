"""The policy-gradient family for language models (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++), over masked
[B, T] arrays: the menu a researcher ablates, each piece a small pure function beside its citation.

B episodes (one prompt + one sampled response each; `group` consecutive episodes share a prompt),
T response tokens. `mask` [B, T] is 1 on real response tokens and 0 after the stop token / on
padding. Every function is pure jnp and jittable; masked positions never reach a result, even if
they hold inf or NaN (inputs are `where`-ed before use, so gradients there are exactly zero).

Where the algorithms differ, and the switch that picks each (configs/ppo.py, grpo.py, rloo.py):
  score shaping     shape_scores                 missing-EOS penalty, clip, leave-one-out baseline
  KL estimator      kl_penalty                   k1 | k2 | k3                         (config.kl.estimator)
  KL placement      compute_rewards / the loss   −β·KL in the reward | β·KL in the loss (config.kl.placement)
  advantage         advantages                   gae | grpo | dr_grpo | rloo | reinforce_pp (config.pg.advantage)
  aggregation       aggregate                    token_mean | sequence_mean | token_sum (config.pg.loss_aggregation)
  policy loss       POLICY_LOSSES                ppo_clip | dual_clip | gspo | cispo  (config.pg.policy_loss)

Units: log-probs, KL and entropy in nats per token; scores in reward units.
"""

from __future__ import annotations

import dataclasses

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


# --- KL estimators -----------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str = "k1") -> Array:
    """Per-token estimate [B, T] of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman 2020,
    "Approximating KL divergence"; log r = log π_ref − log π):

    k1 = −log r           unbiased, can be negative (lm-human-preferences, InstructGPT);
    k2 = ½ (log r)²       biased, ≥ 0, low variance; its gradient is the KL's (as a loss term);
    k3 = (r − 1) − log r  unbiased, ≥ 0, ≈ k1²/2 when the policies are close (GRPO's, in the loss).
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    if kind == "k3":
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"config.kl.estimator: {kind!r} is unknown. Use one of {KL_ESTIMATORS}.")


def last_true_index(mask: Array) -> tuple[Array, Array]:
    """(index [B] of the last nonzero entry of each row, whether the row has any [B])."""
    T = mask.shape[1]
    nonzero = mask != 0
    last = T - 1 - jnp.argmax(nonzero[:, ::-1], axis=1)
    return last, jnp.any(nonzero, axis=1)


# --- scores and rewards ------------------------------------------------------------------------------------------

SCORE_BASELINES = ("none", "loo")


def shape_scores(
    scores: Array,
    ended: Array,
    missing_eos_penalty: float | None = None,
    clip: float = 0.0,
    baseline: str = "none",
    group: int = 1,
) -> tuple[Array, Array]:
    """(score [B] as judged, score [B] the policy maximises) from the raw score [B] of each episode.

    1. no stop token sampled (ended [B] False): the fixed score `missing_eos_penalty`
       (lm-human-preferences' penalty_reward_value; None: off);
    2. clipped to ±clip (0: off);
    3. baseline "loo": minus the mean score of the prompt's other samples (leave_one_out_scores).
    The first two are what the evaluation would call the score (objective/scores); the third
    only re-centres it, per prompt.
    """
    if missing_eos_penalty is not None:
        scores = jnp.where(ended, scores, jnp.asarray(missing_eos_penalty, scores.dtype))
    if clip > 0:
        scores = jnp.clip(scores, -clip, clip)
    if baseline not in SCORE_BASELINES:
        raise ValueError(f"config.pg.score_baseline={baseline!r}: use one of {SCORE_BASELINES}.")
    return scores, leave_one_out_scores(scores, group) if baseline == "loo" else scores


def overlong_penalty(lengths: Array, max_len: int, cache: int) -> Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a length reward [B] added to the score:
    0 up to L_max − L_cache tokens, then falling linearly to −1 at L_max = max_len (the response budget),
    −1 beyond; cache = L_cache (0: off, all zeros)."""
    if cache <= 0:
        return jnp.zeros(lengths.shape, jnp.float32)
    lengths = lengths.astype(jnp.float32)
    start = max_len - cache
    ramp = (start - lengths) / cache
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


def compute_rewards(
    scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, kl_coef: Array | float, kl_kind: str = "k1"
) -> tuple[Array, Array, Array]:
    """Per-token rewards [B, T], KL [B, T] and the KL part of the reward [B, T].

    Ziegler et al. 2019 eq. 2 / InstructGPT eq. 2: R = r_θ(x, y) − β·KL, spread
    over tokens: r_t = −β·KL_t on every real token, plus the score (scores [B])
    on the row's last real token. All three are 0 on masked positions; a row
    with no real token gets no reward at all (its score is dropped: there is no
    action to credit). With the KL in the loss instead, pass kl_coef = 0.
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
        raise ValueError(
            f"leave_one_out_scores: group={group} must be >= 2 and divide the {scores.shape[0]} "
            f"scores (rollout.samples_per_prompt must divide batch_size)."
        )
    s = scores.reshape(-1, group)
    return ((s - s.mean(axis=1, keepdims=True)) * group / (group - 1)).reshape(scores.shape)


# --- advantages --------------------------------------------------------------------------------------------------

ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")


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


def group_advantages(returns: Array, group: int, kind: str, eps: float = 1e-4) -> Array:
    """Critic-free advantage [B] of each episode from its return [B] and its group's (`group`
    consecutive episodes = the samples of one prompt; mean_g, std_g over the group):

    grpo     (R_i − mean_g) / (std_g + eps)    DeepSeekMath (Shao et al. 2024), outcome supervision;
             std with Bessel's correction (as TRL and verl); G = 1 or equal returns give 0, never NaN
    dr_grpo  R_i − mean_g                      Liu et al. 2025 ("Understanding R1-Zero-like training")
    rloo     R_i − mean_{j≠i} R_j              Ahmadian et al. 2024 (Kool et al. 2019); needs G >= 2
    """
    if returns.shape[0] % group:
        raise ValueError(f"group_advantages: group={group} does not divide the {returns.shape[0]} episodes.")
    r = returns.reshape(-1, group)
    # A group whose returns are all equal carries no signal: exactly 0, not the float32 residue of subtracting
    # a computed mean (up to 7e-2 after dividing by std + eps).
    tied = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    if kind == "rloo":
        return jnp.where(tied, 0.0, leave_one_out_scores(returns, group).reshape(r.shape)).reshape(returns.shape)
    centred = jnp.where(tied, 0.0, r - jnp.mean(r, axis=1, keepdims=True))
    if kind == "dr_grpo":
        return centred.reshape(returns.shape)
    if kind == "grpo":
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group - 1, 1))
        return (centred / (std + eps)).reshape(returns.shape)
    raise ValueError(f"group_advantages: {kind!r} is not a group estimator (grpo, dr_grpo, rloo).")


def advantages(
    kind: str,
    rewards: Array,
    mask: Array,
    values: Array | None = None,
    group: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Array, Array | None]:
    """(advantages [B, T], returns [B, T] for the critic or None) of per-token rewards [B, T]
    (compute_rewards: the score on the last real token, −β·KL_t on every token when the KL is in the
    reward). Masked positions get 0.

    gae           GAE with the critic's values [B, T] (Schulman et al. 2016; lm-human-preferences)
    grpo | dr_grpo | rloo
                  group_advantages of the episode return R_i = Σ_t r_t, the same on every token
                  (the whole response is one action: outcome supervision)
    reinforce_pp  the reward-to-go G_t = Σ_{s≥t} γ^{s−t} r_s, whitened over every real token of the
                  global batch (REINFORCE++, Hu 2025: no critic, no group)
    """
    real = mask != 0
    if kind == "gae":
        if values is None:
            raise ValueError("advantages('gae') needs the critic's values.")
        return gae(rewards, values, mask, gamma, lam)
    if kind == "reinforce_pp":
        to_go, _ = gae(rewards, jnp.zeros_like(rewards), mask, gamma, 1.0)  # GAE with V = 0, λ = 1
        return masked_whiten(to_go, mask), None
    if kind in ("grpo", "dr_grpo", "rloo"):
        per_episode = group_advantages(jnp.sum(jnp.where(real, rewards, 0.0), axis=1), group, kind)
        return jnp.where(real, per_episode[:, None], 0.0), None
    raise ValueError(f"config.pg.advantage={kind!r} is unknown. Use one of {ADVANTAGES}.")


# --- loss aggregation --------------------------------------------------------------------------------------------

AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum")


def aggregate(x: Array, mask: Array, how: str = "token_mean", budget: int | None = None) -> Array:
    """A per-token loss [B, T] reduced to f32 []:

    token_mean     Σ_{b,t} m·x / Σ_{b,t} m: every token of the batch weighs the same (PPO, lm-human-preferences)
    sequence_mean  mean over episodes with a token of Σ_t m·x / Σ_t m (GRPO, DeepSeekMath eq. 3's 1/|o_i|),
                   so a long response weighs per token less than a short one
    token_sum      Σ_{b,t} m·x / (B · T): a constant normaliser, T the response budget (Dr. GRPO,
                   which removes GRPO's length bias): `budget` (rollout.max_new_tokens), else x's width
    """
    real = mask != 0
    x = jnp.where(real, x, 0.0)
    if how == "token_mean":
        return masked_mean(x, mask)
    if how == "sequence_mean":
        per_row = masked_mean(x, mask, axis=1)
        return masked_mean(per_row, jnp.any(real, axis=1))
    if how == "token_sum":
        return jnp.sum(x) / (x.shape[0] * (budget or x.shape[1]))
    raise ValueError(f"config.pg.loss_aggregation={how!r} is unknown. Use one of {AGGREGATIONS}.")


# --- losses ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What a policy loss reads from config.pg: clip_low / clip_high (ε, and DAPO's ε_high ≠ ε_low), the
    dual-clip bound c, and how per-token terms are reduced (aggregate; budget: token_sum's constant)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 3.0
    aggregation: str = "token_mean"
    budget: int | None = None

    @classmethod
    def of(cls, pg, budget: int | None = None) -> LossSettings:
        """From config.pg (clip_range, clip_range_high: 0 means symmetric, dual_clip_c, loss_aggregation)."""
        return cls(pg.clip_range, pg.clip_range_high or pg.clip_range, pg.dual_clip_c, pg.loss_aggregation, budget)


# name → (new_logprobs, old_logprobs, advantages, mask, LossSettings) → (loss f32[], stats); the loss is minimised.
# stats: clipfrac, approxkl (½·mean (log ρ)², as lm-human-preferences), ratio_mean, token means over the mask.
# A new loss is one registered function: config.pg.policy_loss picks it and the config check reads this table.
POLICY_LOSSES: dict = {}


def register_policy_loss(name: str):
    def add(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return add


def _log_ratio(new_logprobs, old_logprobs, advantages, mask):
    """(log ρ, A) with masked slots 0 (ρ = 1 there: no overflow, no NaN, zero gradient)."""
    real = mask != 0
    return jnp.where(real, new_logprobs - old_logprobs, 0.0), jnp.where(real, advantages, 0.0)


def _stats(log_ratio, clipped_where, mask):
    return {
        "clipfrac": masked_mean(clipped_where.astype(jnp.float32), mask),
        "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio_mean": masked_mean(jnp.exp(log_ratio), mask),
    }


@register_policy_loss("ppo_clip")
def ppo_clip(new_logprobs, old_logprobs, advantages, mask, s: LossSettings):
    """Schulman et al. 2017 eq. 7: L = −E[min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)]; ε_low = ε_high is PPO's,
    ε_high > ε_low DAPO's clip-higher (Yu et al. 2025 §3.1, ε_low 0.2, ε_high 0.28)."""
    log_ratio, adv = _log_ratio(new_logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high)
    loss = aggregate(jnp.maximum(unclipped, clipped), mask, s.aggregation, s.budget)
    return loss, _stats(log_ratio, clipped > unclipped, mask)


@register_policy_loss("dual_clip")
def dual_clip(new_logprobs, old_logprobs, advantages, mask, s: LossSettings):
    """Dual-clip PPO (Ye et al. 2020, eq. 5): for A < 0 the clipped objective is bounded below by c·A (c = 3),
    so a token whose ratio has grown far past 1 under a negative advantage cannot dominate the batch."""
    log_ratio, adv = _log_ratio(new_logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(log_ratio)
    ppo = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high) * adv)
    objective = jnp.where(adv < 0, jnp.maximum(ppo, s.dual_clip * adv), ppo)
    loss = aggregate(-objective, mask, s.aggregation, s.budget)
    return loss, _stats(log_ratio, objective != ratio * adv, mask)


@register_policy_loss("gspo")
def gspo(new_logprobs, old_logprobs, advantages, mask, s: LossSettings):
    """GSPO (Zheng et al. 2025, eqs. 5-7): one importance ratio per sequence, the geometric mean of its tokens'
    s_i = exp(mean_t log ρ_{i,t}), clipped per sequence (their ε: 3e-4 / 4e-4), times the sequence's advantage
    (its tokens' mean; a critic-free advantage is the same on every token); the mean over sequences."""
    log_ratio, adv = _log_ratio(new_logprobs, old_logprobs, advantages, mask)
    has = jnp.any(mask != 0, axis=1)
    seq_ratio = jnp.exp(masked_mean(log_ratio, mask, axis=1))
    seq_adv = masked_mean(adv, mask, axis=1)
    unclipped = -seq_adv * seq_ratio
    clipped = -seq_adv * jnp.clip(seq_ratio, 1.0 - s.clip_low, 1.0 + s.clip_high)
    loss = masked_mean(jnp.maximum(unclipped, clipped), has)
    stats = _stats(log_ratio, jnp.broadcast_to((clipped > unclipped)[:, None], mask.shape), mask)
    return loss, stats


@register_policy_loss("cispo")
def cispo(new_logprobs, old_logprobs, advantages, mask, s: LossSettings):
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4): REINFORCE with a clipped importance weight whose gradient is
    stopped, so no token's gradient is dropped: L = −Σ_t sg(min(ρ_t, 1+ε_high))·A_t·log π_t over the batch's
    tokens, divided by their number (token_mean; the loss only defines its gradient)."""
    log_ratio, adv = _log_ratio(new_logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + s.clip_high))
    logp = jnp.where(mask != 0, new_logprobs, 0.0)
    loss = aggregate(-weight * adv * logp, mask, s.aggregation, s.budget)
    return loss, _stats(log_ratio, ratio > 1.0 + s.clip_high, mask)


def policy_loss(
    new_logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_range: float,
    aggregation: str = "token_mean",
    budget: int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped surrogate (ppo_clip) with a symmetric ε: (f32[], stats); all inputs [B, T]."""
    return ppo_clip(
        new_logprobs, old_logprobs, advantages, mask, LossSettings(clip_range, clip_range, 3.0, aggregation, budget)
    )


# --- the sampler–trainer mismatch ---------------------------------------------------------------------------------

CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")


def rollout_correction(
    old_logprobs: Array,
    sampler_logprobs: Array,
    mask: Array,
    kind: str = "none",
    level: str = "token",
    cap: float = 2.0,
) -> tuple[Array, dict[str, Array]]:
    """Importance weights [B, T] for the gap between the policy that sampled (the sampler's log-probs, e.g. an
    inference engine's, or here the KV-cache decoder's, in another dtype) and the trainer's π_old, and their
    stats. w = π_old / π_sampler per token (level "token") or its product over the response (level "sequence",
    the same on every token), then
      none  1 (the weights are measured and logged, not applied)
      tis   min(w, cap): truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
            brings you off-policy RL training": token level, cap C = 2)
      mis   w where w ≤ cap, else 0: masked importance sampling (a token / sequence too far off is dropped)
    The weights scale the advantages (gradient stopped); stats: the raw w's mean and max, and the share of w
    beyond the cap, over the mask."""
    real = mask != 0
    log_w = jnp.where(real, old_logprobs - sampler_logprobs, 0.0)
    if level == "sequence":
        log_w = jnp.where(real, jnp.sum(log_w, axis=1, keepdims=True), 0.0)
    elif level != "token":
        raise ValueError(f"config.pg.correction_level={level!r} is unknown. Use one of {CORRECTION_LEVELS}.")
    w = jnp.exp(jnp.minimum(log_w, 80.0))  # no inf for a wild token: it is beyond any cap anyway
    stats = {
        "is_weight_mean": masked_mean(w, mask),
        "is_weight_max": jnp.max(jnp.where(real, w, 0.0)),
        "is_beyond_cap_frac": masked_mean((w > cap).astype(jnp.float32), mask),
    }
    if kind == "none":
        return jnp.ones_like(w), stats
    if kind == "tis":
        return jax.lax.stop_gradient(jnp.minimum(w, cap)), stats
    if kind == "mis":
        return jax.lax.stop_gradient(jnp.where(w <= cap, w, 0.0)), stats
    raise ValueError(f"config.pg.rollout_correction={kind!r} is unknown. Use one of {CORRECTIONS}.")


def value_loss(
    new_values: Array, old_values: Array, returns: Array, mask: Array, clip_range_value: float
) -> tuple[Array, dict[str, Array]]:
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
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "vpred_mean": masked_mean(new_values, mask),
    }
    return loss, stats


def kl_loss(
    new_logprobs: Array,
    ref_logprobs: Array,
    mask: Array,
    kind: str = "k3",
    aggregation: str = "token_mean",
    budget: int | None = None,
) -> Array:
    """The KL term of the loss (DeepSeekMath eq. 3's D_KL[π ‖ π_ref], k3 there), f32 [], to be scaled by β:
    the KL's placement in the loss instead of in the reward. Its gradient flows through new_logprobs."""
    real = mask != 0  # clean both inputs first: exp() of a garbage log-ratio would put NaN in the gradient
    new = jnp.where(real, new_logprobs, 0.0)
    ref = jnp.where(real, jax.lax.stop_gradient(ref_logprobs), 0.0)
    return aggregate(kl_penalty(new, ref, kind), mask, aggregation, budget)


# --- the KL coefficient β ----------------------------------------------------------------------------------------


def kl_controller_init(init_kl_coef: float) -> dict[str, Array]:
    """Controller state {"kl_coef": f32[]}: 0-d arrays, so it lives in the train state and checkpoint."""
    return {"kl_coef": jnp.asarray(init_kl_coef, jnp.float32)}


def kl_controller_update(
    state: dict[str, Array],
    observed_kl: Array | float,
    n_steps: int | Array,
    kind: str = "fixed",
    target: float | None = None,
    horizon: float | None = None,
) -> dict[str, Array]:
    """Next controller state after a batch of `n_steps` episodes with mean summed KL `observed_kl` (nats).

    fixed: β stays. adaptive (Ziegler et al. 2019 §2.2): e = clip(KL/target − 1, ±0.2),
    β ← β·(1 + e·n_steps/horizon), a proportional controller steering KL to target.
    """
    if kind == "fixed":
        return {"kl_coef": jnp.asarray(state["kl_coef"], jnp.float32)}
    if kind != "adaptive":
        raise ValueError(f"config.kl.kind: {kind!r} is unknown. Use fixed or adaptive.")
    if target is None or horizon is None or target <= 0 or horizon <= 0:
        raise ValueError(
            f"config.kl: adaptive KL needs target > 0 and horizon > 0 (got target={target}, "
            f"horizon={horizon}). Set e.g. --config.kl.target=6 --config.kl.horizon=10000."
        )
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


def truncate_after_stop_token(tokens: Array, stop_token: int, truncate_after: int, pad_id: int) -> tuple[Array, Array]:
    """lm-human-preferences' postprocessing: cut each response after its first stop token at index ≥ truncate_after.

    Returns (tokens [B, T] with everything after that stop token set to pad_id,
    found [B] bool: whether the row had one). Rows without one are left as they
    are; the caller gives them the fixed penalty score (`penalty_reward_value`).
    """
    T = tokens.shape[1]
    hits = (tokens == stop_token) & (jnp.arange(T)[None, :] >= truncate_after)
    cut = jnp.arange(T)[None, :] > first_true_index(hits)[:, None]
    return jnp.where(cut, jnp.asarray(pad_id, tokens.dtype), tokens), jnp.any(hits, axis=1)
