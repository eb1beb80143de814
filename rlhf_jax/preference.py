"""Preference losses and metrics over reward-model scores (pure jnp, jittable).

Every function takes
    rewards  f32 [B, K]   the RM's score of each of the K responses to a prompt, BEST FIRST
    valid    int [B, K]   1 where the response exists (prompts may have fewer than K)
so a ranking is just index order: response i is preferred to response j whenever i < j.
Invalid entries are replaced (with `where`, not multiplied by 0) before any arithmetic, so
padding that holds inf/NaN cannot leak into a loss or its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairs(valid: jax.Array) -> jax.Array:
    """bool [B, K, K]: (i, j) is a compared pair, i.e. i < j and both responses exist."""
    v = valid > 0
    K = v.shape[-1]
    upper = jnp.arange(K)[:, None] < jnp.arange(K)[None, :]
    return v[:, :, None] & v[:, None, :] & upper


def _clean(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """f32 rewards with invalid entries set to 0, so their values (even NaN) reach no gradient."""
    return jnp.where(valid > 0, rewards.astype(jnp.float32), 0.0)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask (0 when mask is empty, so a loss stays finite and its gradient 0)."""
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def ranking_loss(rewards: jax.Array, valid: jax.Array, margin: float = 0.0) -> tuple[jax.Array, dict]:
    """InstructGPT eq. 1: per prompt, -1/C(n,2) Σ_{i<j} log σ(r_i - r_j - margin) over its n valid
    responses; averaged over prompts with n >= 2 (the others are left out).

    Weighting each prompt's C(n,2) pairs by 1/C(n,2) makes a prompt one batch element however many
    responses it has (the paper's fix for overfitting to correlated pairs). Returns (loss [], stats)
    with stats {"num_pairs", "num_examples"} (f32 [] counts).
    """
    r = _clean(rewards, valid)
    pairs = _pairs(valid)
    logsig = jax.nn.log_sigmoid(r[:, :, None] - r[:, None, :] - margin)  # [B, K, K], stable for large gaps
    n_pairs = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)  # C(n, 2) per prompt
    per_example = -jnp.sum(jnp.where(pairs, logsig, 0.0), axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    has_pair = n_pairs > 0
    loss = _masked_mean(per_example, has_pair)
    return loss, {"num_pairs": jnp.sum(n_pairs), "num_examples": jnp.sum(has_pair).astype(jnp.float32)}


def best_of_k_loss(rewards: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
    """lm-human-preferences' loss: softmax cross-entropy over the K rewards with the best response
    (index 0) as the label; invalid responses are left out of the softmax. Averaged over prompts
    whose best response exists and that have >= 2 valid responses. Returns (loss [], stats)."""
    r = _clean(rewards, valid)
    v = valid > 0
    logp = jax.nn.log_softmax(jnp.where(v, r, -jnp.inf), axis=-1)
    counted = v[:, 0] & (jnp.sum(v, axis=-1) >= 2)
    loss = _masked_mean(-logp[:, 0], counted)
    return loss, {"num_examples": jnp.sum(counted).astype(jnp.float32)}


def centering_penalty(rewards: jax.Array, valid: jax.Array, coef: float) -> jax.Array:
    """coef · mean(r²) over valid responses: keeps the RM's scores near 0 (the ranking loss only
    sees differences, so without it the mean reward drifts freely)."""
    r = _clean(rewards, valid)
    return coef * _masked_mean(r * r, valid > 0)


def num_compared(loss_fn, valid: jax.Array) -> jax.Array:
    """How many comparisons (prompts) of a batch [B, K] the preference loss `loss_fn(rewards, valid) -> (mean,
    {"num_examples", ...})` averages over, at least 1. It depends on `valid` alone, so the loss run on zero
    rewards gives it: the whole batch's denominator, by which each microbatch's share of the loss is weighted."""
    _, stats = loss_fn(jnp.zeros(valid.shape, jnp.float32), valid)
    return jnp.maximum(stats["num_examples"], 1.0)


def pairwise_accuracy(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of all compared pairs (i < j, both valid) in the batch ranked right, r_i > r_j;
    a tie counts 1/2. K > 2 counts every pair of a prompt. NaN when the batch has no pair."""
    r = _clean(rewards, valid)
    pairs = _pairs(valid)
    di, dj = r[:, :, None], r[:, None, :]
    score = jnp.where(di > dj, 1.0, jnp.where(di == dj, 0.5, 0.0))
    n = jnp.sum(pairs)
    return jnp.where(n > 0, jnp.sum(jnp.where(pairs, score, 0.0)) / jnp.maximum(n, 1), jnp.nan)


def comparison_metrics(rewards: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """{"accuracy", "chosen_reward", "rejected_reward", "margin"} (f32 []).

    Over prompts with >= 2 valid responses: chosen_reward is the mean of r_0, rejected_reward the
    mean over prompts of the mean of their other valid rewards, margin = chosen - rejected.
    """
    r = _clean(rewards, valid)
    v = valid > 0
    counted = v[:, 0] & (jnp.sum(v, axis=-1) >= 2)
    others = v & (jnp.arange(v.shape[-1]) > 0)
    rejected = jnp.sum(jnp.where(others, r, 0.0), axis=-1) / jnp.maximum(jnp.sum(others, axis=-1), 1)
    chosen = _masked_mean(r[:, 0], counted)
    rejected = _masked_mean(rejected, counted)
    return {
        "accuracy": pairwise_accuracy(r, valid),
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "margin": chosen - rejected,
    }


def normalization_from_rewards(
    rewards_1d: jax.Array, target_mean: float = 0.0, target_std: float = 1.0, eps: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """(gain, bias) such that gain·r + bias has mean `target_mean` and (population) std `target_std`
    on this sample of rewards [N] (lm-human-preferences' reward normalisation). eps keeps the gain
    finite when every reward is equal."""
    r = jnp.asarray(rewards_1d, jnp.float32).reshape(-1)
    mean, std = jnp.mean(r), jnp.std(r)
    gain = target_std / jnp.maximum(std, eps)
    return gain, target_mean - gain * mean


def apply_normalization(rewards: jax.Array, gain: jax.Array | float, bias: jax.Array | float) -> jax.Array:
    """gain · rewards + bias, any shape."""
    return gain * rewards + bias


def fold_normalization(head: dict, gain: jax.Array | float, bias: jax.Array | float) -> dict:
    """A scalar head {"kernel" [D, 1], "bias" [1]} whose output is gain · (that head's output) + bias:
    gain·(h·w + b) + bias = h·(gain·w) + (gain·b + bias). A critic started from the RM (InstructGPT) gets
    the RM's normalisation folded into its value head, so its first values are in the units of the
    normalised score it is trained to predict."""
    return {"kernel": gain * head["kernel"], "bias": gain * head["bias"] + bias}


# --- reward-model ensembles -------------------------------------------------------------------------------------------
#
# An ensemble's scores are [E, N]: E members (each normalised on its own), N sequences. A single RM is an
# ensemble of one, for which every aggregate below is its score.

AGGREGATES = ("mean", "lcb", "min")


def aggregate_rewards(scores: jax.Array, how: str = "mean", lcb_coef: float = 1.0) -> jax.Array:
    """The reward a policy optimises from an ensemble's scores [E, N] → [N] (f32).

    mean: (1/E) Σ_e r_e — Coste et al. 2023's mean optimisation; Eisenstein et al. 2023's mean.
    lcb:  mean − λ·std_e r_e (population std over members; λ = lcb_coef) — a lower confidence bound, the
          uncertainty penalty of Eisenstein et al. 2023 ("mean minus std"); Coste et al.'s UWO subtracts
          λ·variance instead.
    min:  min_e r_e — worst-case optimisation (Coste et al. 2023, WCO).
    """
    r = jnp.asarray(scores, jnp.float32)
    if how == "mean":
        return jnp.mean(r, axis=0)
    if how == "lcb":
        return jnp.mean(r, axis=0) - lcb_coef * jnp.std(r, axis=0)
    if how == "min":
        return jnp.min(r, axis=0)
    raise ValueError(f"reward.aggregate={how!r}: use one of {AGGREGATES}.")


def ranking_disagreement(rewards: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean pairwise disagreement of an ensemble's rewards [E, B, K] (valid [B, K]): over member pairs a < b
    and compared response pairs i < j, the share where a and b order i and j differently (f32 []; 0 for E = 1).
    Scale-free, so it compares members before their normalisation."""
    E = rewards.shape[0]
    order = jnp.sign(rewards[:, :, :, None] - rewards[:, :, None, :])  # [E, B, K, K]
    pairs = _pairs(valid)  # [B, K, K]
    members = jnp.arange(E)[:, None] < jnp.arange(E)[None, :]  # [E, E]: a < b
    differ = (order[:, None] != order[None, :]) & pairs & members[:, :, None, None, None]
    count = jnp.sum(members) * jnp.sum(pairs)
    return jnp.sum(differ) / jnp.maximum(count, 1)


# --- direct preference optimisation: the policy as its own reward model ----------------------------------------------
#
# Every loss below takes the implicit rewards ρ [B, K] of a policy's responses, best first (see
# implicit_rewards): ρ = log π(y|x) − log π_ref(y|x) for DPO, IPO and Plackett-Luce, the length-normalised
# log π(y|x) / |y| for SimPO. Pairwise losses average over each prompt's compared pairs (every pair i < j, as
# the RM's eq. 1, or best-vs-worst only), then over prompts; the listwise one uses the whole ranking.

DPO_LOSSES = ("dpo", "ipo", "simpo", "plackett_luce")
DPO_PAIRS = ("all", "best_worst")


def implicit_rewards(loss: str, logps: jax.Array, ref_logps: jax.Array | None, lengths: jax.Array) -> jax.Array:
    """ρ [B, K] from the policy's response log-prob sums, the reference's (None for SimPO) and the response
    lengths in tokens (the response's own tokens only, never the prompt's)."""
    if loss == "simpo":  # Meng et al. 2024: the average log-likelihood, no reference model
        return logps / jnp.maximum(lengths, 1.0)
    return logps - ref_logps  # Rafailov et al. 2023: r(x, y) = β log π(y|x) / π_ref(y|x), β applied later


def _pair_mask(valid: jax.Array, pairs: str) -> jax.Array:
    """bool [B, K, K]: the compared pairs (i better than j)."""
    if pairs == "all":
        return _pairs(valid)
    if pairs != "best_worst":
        raise ValueError(f"config.dpo.pairs={pairs!r} is unknown; use one of {DPO_PAIRS}.")
    v = valid > 0
    K = v.shape[-1]
    worst = K - 1 - jnp.argmax(v[:, ::-1], axis=-1)  # the last valid response
    only = (jnp.arange(K)[:, None] == 0) & (jnp.arange(K)[None, :] == worst[:, None, None])
    return _pairs(valid) & only


def pairwise_preference_loss(
    rho: jax.Array,
    valid: jax.Array,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    pairs: str = "all",
) -> tuple[jax.Array, dict]:
    """The pairwise members of the family on margins m = ρ_i − ρ_j of compared pairs (i better):

    dpo    −(1−ε)·log σ(β·m) − ε·log σ(−β·m)   Rafailov et al. 2023 eq. 7; ε > 0 is label smoothing
                                               (conservative DPO: a share ε of labels assumed flipped)
    ipo    (m − 1/(2β))²                       Azar et al. 2023 (τ = β): a margin target, not → ∞
    simpo  −log σ(β·m − γ)                     Meng et al. 2024, ρ the average log-likelihood

    Returns (loss [], stats {"num_pairs", "num_examples"}): the mean over prompts with a pair of the mean
    over each prompt's pairs.
    """
    r = _clean(rho, valid)
    mask = _pair_mask(valid, pairs)
    m = r[:, :, None] - r[:, None, :]  # [B, K, K]: ρ_i − ρ_j
    if loss == "dpo":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * m) - label_smoothing * jax.nn.log_sigmoid(
            -beta * m
        )
    elif loss == "ipo":
        per_pair = jnp.square(m - 1.0 / (2.0 * beta))
    elif loss == "simpo":
        per_pair = -jax.nn.log_sigmoid(beta * m - gamma)
    else:
        raise ValueError(f"pairwise_preference_loss: {loss!r} is not a pairwise loss (dpo, ipo, simpo).")
    n_pairs = jnp.sum(mask, axis=(1, 2)).astype(jnp.float32)
    per_example = jnp.sum(jnp.where(mask, per_pair, 0.0), axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
    has_pair = n_pairs > 0
    return _masked_mean(per_example, has_pair), {
        "num_pairs": jnp.sum(n_pairs),
        "num_examples": jnp.sum(has_pair).astype(jnp.float32),
    }


def plackett_luce_loss(rho: jax.Array, valid: jax.Array, beta: float) -> tuple[jax.Array, dict]:
    """The K-way ranking's negative log-likelihood under Plackett-Luce with scores β·ρ (Rafailov et al. 2023,
    Appendix A.3): −Σ_{k<n−1} [β·ρ_k − log Σ_{j≥k} exp(β·ρ_j)] over a prompt's n valid responses,
    best first; averaged over prompts with n >= 2. At K = 2 it is DPO's −log σ(β(ρ_0 − ρ_1)) exactly."""
    v = valid > 0
    # A missing response scores -1e30, not -inf: exp() of it is exactly 0, and no inf − inf reaches a gradient.
    s = jnp.where(v, beta * _clean(rho, valid), -1e30)
    # log Σ_{j ≥ k} exp(s_j): a reverse cumulative logsumexp over the (best-first) positions
    tail = jax.lax.cumlogsumexp(s, axis=s.ndim - 1, reverse=True)
    n = jnp.sum(v, axis=-1)
    counted = jnp.arange(v.shape[-1])[None, :] < (n - 1)[:, None]  # the last choice is forced: no term
    counted = counted & v
    per_example = -jnp.sum(jnp.where(counted, s - jnp.where(counted, tail, 0.0), 0.0), axis=-1)
    has_pair = n >= 2
    return _masked_mean(per_example, has_pair), {
        "num_pairs": jnp.sum(counted).astype(jnp.float32),
        "num_examples": jnp.sum(has_pair).astype(jnp.float32),
    }


def dpo_family_loss(
    rho: jax.Array,
    valid: jax.Array,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    pairs: str = "all",
) -> tuple[jax.Array, dict]:
    """config.dpo.loss's loss (DPO_LOSSES) of implicit rewards ρ [B, K] (best first): (loss [], stats)."""
    if loss == "plackett_luce":
        return plackett_luce_loss(rho, valid, beta)
    if loss not in DPO_LOSSES:
        raise ValueError(f"config.dpo.loss={loss!r} is unknown; use one of {DPO_LOSSES}.")
    return pairwise_preference_loss(rho, valid, loss, beta, label_smoothing, gamma, pairs)
