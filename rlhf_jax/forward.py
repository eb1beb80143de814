"""The forward passes every stage computes from a params tree (`apply`, the model on a padded batch, and
what is read off its outputs): token log-probs and entropies, token NLL, response log-probs (PPO and its
family, DPO, evaluation) and sequence scores (the reward model). Losses live in the stages, `rl.py` and
`preference.py`.

One home, so that stages never import each other. All functions are pure and jittable; `model`
is a `TransformerLM` and `params` the tree (or subtree) it applies to. Units: nats.

Two layouts of a (prompt, response) pair occur:
  split   prompt [B, P] left-padded (real tokens at the right end), response [B, N] right-padded:
          the rollout layout, where position P-1 predicts response token 0;
  joined  tokens [N, L] = prompt + response, right-padded, with a target mask marking the tokens
          whose log-prob counts: the LM and comparison layout, where position t predicts t+1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import lora, preference
from rlhf_jax.models.gpt import mask_padded_vocab, positions_from_mask
from rlhf_jax.models.layers import matmul

Array = jax.Array


def apply(params, model, tokens, input_mask, heads=("lm",), rng=None):
    """model.apply on a (possibly padded) batch: positions count only real tokens; dropout iff `rng`.
    With LoRA on, only the adapters (and scalar heads) get gradients (rlhf_jax/lora.py)."""
    params = lora.stop_frozen_gradients(params, model.cfg)
    return model.apply(
        {"params": params},
        tokens,
        positions_from_mask(input_mask),
        input_mask,
        heads=heads,
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )


# --- per-token quantities from logits ------------------------------------------------------------------------------


def logprobs_from_logits(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
    """log p(tokens) [B, T] in nats under softmax(logits / temperature); logits [B, T, V], computed in f32.

    The temperature is the one used for sampling, so these are the log-probs of the distribution
    the responses were drawn from (before any top-k / top-p filtering, which the sampler applies).
    """
    logits = logits.astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy [B, T] in nats of softmax(logits / temperature); logits [B, T, V]."""
    logits = logits.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


# --- log-probs without the full-vocabulary logits ------------------------------------------------------------------

# The most logits (B · tokens · V, f32) one chunk of token_stats holds: 2^26 (256 MiB). A batch under it is
# computed in one piece, as the model's own logits; a larger one (a pod batch of 256 × 512 tokens over SmolLM2's
# 49,152: 6.4G) a chunk of tokens at a time, recomputed in the backward pass, as Liger's fused linear
# cross-entropy and Cut Cross-Entropy do, so no [B, T, V] tensor is ever live. Measured on SmolLM2's GRPO update
# (16 × 95 tokens: 75M logits) with 2^24: XLA's temporaries 2.98 → 2.44 GB, the iteration 8% slower on a
# 2-core CPU (the recomputed projection), hence the larger default.
LOGITS_PER_CHUNK = 2**26


def output_projection(params, model) -> tuple[str, Array]:
    """(einsum, weight) of the LM head: the tied embedding [V, D] or lm_head's kernel [D, V] (LoRA merged)."""
    if model.cfg.tie_embeddings:
        return "btd,vd->btv", params["trunk"]["embed"]
    return "btd,dv->btv", lora.merged(params["lm_head"], model.cfg)["kernel"]


def lm_head(params, model):
    """The LM head as a function: hidden [..., T, D] → f32 logits [..., T, V], the rows past the tokenizer's
    vocabulary masked. The trainer's log-probs and the sampler's draws both go through it, so that they agree,
    and each runs it only at the positions it needs."""
    eq, w = output_projection(params, model)
    cfg = model.cfg
    return lambda h: mask_padded_vocab(matmul(eq, h, w, cfg.compute_dtype, jnp.float32), cfg)


def token_chunks(T: int, logits_per_token: int) -> tuple[int, int]:
    """(n, size): the fewest chunks of T tokens whose logits (logits_per_token each) fit LOGITS_PER_CHUNK, all of
    one size: 63 tokens at most 42 a chunk are 2 of 32, not 2 of 42, whose padding (21 tokens) the projection
    would compute twice (forward, then recomputed in the backward pass)."""
    n = -(-T // max(1, LOGITS_PER_CHUNK // max(logits_per_token, 1)))
    return n, -(-T // n)


def token_stats(
    params, model, tokens, input_mask, targets, temperature=1.0, entropy=False, heads=(), rng=None, first: int = 0,
    at=None,
):  # fmt: skip
    """From one pass over the trunk of tokens [B, T]: "logprobs" [B, T - first] of `targets` [B, T - first] under
    softmax(logits / temperature) at positions first..T-1, with entropy=True their "entropy", and the model's
    outputs for `heads` (e.g. "values") at every position. The LM head runs only at those positions (a
    rollout's prompt needs none: `first` = P - 1), or with `at` int [B, R] at those positions of each row
    (targets [B, R]; -1 computes position 0's, for the caller to mask), at most LOGITS_PER_CHUNK logits at a
    time (see above). Dropout iff `rng`."""
    out = apply(params, model, tokens, input_mask, heads=heads, rng=rng)
    head = lm_head(lora.stop_frozen_gradients(params, model.cfg), model)
    cfg = model.cfg

    def stats(h, t):
        logits = head(h)
        lp = logprobs_from_logits(logits, t, temperature)
        return lp, (entropy_from_logits(logits, temperature) if entropy else jnp.zeros_like(lp))

    hidden = out["hidden"][:, first:]
    if at is not None:
        hidden = jnp.take_along_axis(hidden, jnp.maximum(at, 0)[..., None], axis=1)
    B, T, _ = hidden.shape
    n, chunk = token_chunks(T, B * cfg.vocab_size)
    if n == 1:
        lp, ent = stats(hidden, targets)
    else:  # a lax.map over chunks of tokens, each recomputed in the backward pass
        pad = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        split = lambda x: pad(x).reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)
        lp, ent = jax.lax.map(jax.checkpoint(lambda xs: stats(*xs)), (split(hidden), split(targets)))
        lp, ent = (x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T] for x in (lp, ent))
    out["logprobs"] = lp
    if entropy:
        out["entropy"] = ent
    return out


# --- the joined layout: LM loss, comparison log-probs ------------------------------------------------------------


def token_nll(params, model, batch, rng=None) -> tuple[Array, Array]:
    """Next-token cross-entropy f32 [B, L] and its target mask [B, L] for LM batches
    {tokens, input_mask, loss_mask} int32 [B, L+1]: the model reads tokens[:, :-1] and predicts
    tokens[:, 1:]; a target counts where both its loss_mask and its input_mask are 1."""
    inputs, input_mask = batch["tokens"][:, :-1], batch["input_mask"][:, :-1]
    targets = batch["tokens"][:, 1:]
    target_mask = (batch["loss_mask"][:, 1:] * batch["input_mask"][:, 1:]).astype(jnp.float32)
    logp = token_stats(params, model, inputs, input_mask, targets, rng=rng)["logprobs"]
    return jnp.where(target_mask > 0, -logp, 0.0), target_mask


def summed_token_nll(params, model, batch, rng=None) -> tuple[Array, Array]:
    """(Σ NLL over the batch's targets, number of targets): f32 [] each; divide for nats / token."""
    nll, mask = token_nll(params, model, batch, rng)
    return jnp.sum(nll * mask), jnp.sum(mask)


def sequence_logprobs(params, model, tokens, input_mask, target_mask, rng=None, at=None) -> tuple[Array, Array]:
    """(Σ_t log π(x_t | x_<t) over the target tokens [N], number of target tokens [N]) for joined rows
    tokens / input_mask / target_mask int [N, L] (right-padded; target_mask[t] = 1 on response tokens). With
    `at` int [N, R], the positions t - 1 of those targets, then -1 (comparison_data.trimmed's "response_at"),
    the LM head runs at those R positions only: the same sums, without the prompts' logits."""
    targets, mask = tokens[:, 1:], (target_mask[:, 1:] * input_mask[:, 1:]) > 0
    if at is not None:
        targets, mask = jnp.take_along_axis(targets, jnp.maximum(at, 0), axis=1), at >= 0
    logp = token_stats(params, model, tokens[:, :-1], input_mask[:, :-1], targets, rng=rng, at=at)["logprobs"]
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)


def response_target_mask(input_mask: Array, prompt_len: Array) -> Array:
    """int32 [..., L]: 1 on the real tokens at index >= prompt_len [...] (the response of a joined row)."""
    at = jnp.arange(input_mask.shape[-1])
    return ((at >= prompt_len[..., None]) & (input_mask > 0)).astype(jnp.int32)


def comparison_logprobs(params, model, batch, rng=None) -> tuple[Array, Array]:
    """(response log-prob sums [B, K], response lengths [B, K]) of comparison records {tokens,
    input_mask [B, K, L], prompt_len [B]}: each of the K responses given the shared prompt. With the
    records' "response_at" [B, K, R] (comparison_data.trimmed), the LM head runs at the responses only."""
    B, K, L = batch["tokens"].shape
    target = response_target_mask(batch["input_mask"], jnp.broadcast_to(batch["prompt_len"][:, None], (B, K)))
    flat = lambda x: x.reshape(B * K, x.shape[-1])
    at = flat(batch["response_at"]) if "response_at" in batch else None
    lp, n = sequence_logprobs(params, model, flat(batch["tokens"]), flat(batch["input_mask"]), flat(target), rng, at=at)
    return lp.reshape(B, K), n.reshape(B, K)


# --- the split layout: rollouts -----------------------------------------------------------------------------------


def response_stats(
    params, model, prompt, prompt_mask, response, response_mask, temperature: float, values: bool = False, rng=None
) -> dict[str, Array]:
    """Per response token [B, N]: "logprobs" (at the sampling temperature), "entropy", and with
    values=True the value head's "values" (the critic's estimate before each token); dropout iff `rng`."""
    P = prompt.shape[1]
    tokens = jnp.concatenate([prompt, response], axis=1)[:, :-1]  # position t-1 predicts response token t
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)[:, :-1]
    heads = ("value",) if values else ()
    out = token_stats(
        params, model, tokens, mask, response, temperature, entropy=True, heads=heads, rng=rng, first=P - 1
    )
    stats = {"logprobs": out["logprobs"], "entropy": out["entropy"]}
    if values:
        stats["values"] = out["values"][:, P - 1 :]
    return stats


def response_logprob_sums(
    params, model, prompt, prompt_mask, response, response_mask, temperature: float, rng=None
) -> Array:
    """Σ_t log π(response_t | prompt, response_<t) per sequence [B] (nats), e.g. for KL estimates; dropout iff
    `rng`."""
    lp = response_stats(params, model, prompt, prompt_mask, response, response_mask, temperature, rng=rng)["logprobs"]
    return jnp.sum(jnp.where(response_mask > 0, lp, 0.0), axis=1)


# --- sequence scores (the reward head) ----------------------------------------------------------------------------


def sequence_rewards(params, model, tokens, input_mask, rng=None) -> Array:
    """Reward of each sequence, read at its last real token: [N, L] → [N] (f32). Pads may sit on either side."""
    out = apply(params, model, tokens, input_mask, heads=("reward",), rng=rng)
    last = input_mask.shape[-1] - 1 - jnp.argmax(input_mask[:, ::-1], axis=-1)
    return jnp.take_along_axis(out["rewards"], last[:, None], axis=-1)[:, 0]


def comparison_rewards(params, model, batch, rng=None) -> Array:
    """[B, K] rewards for the K responses of each comparison record {tokens, input_mask [B, K, L]}."""
    B, K, L = batch["tokens"].shape
    r = sequence_rewards(params, model, batch["tokens"].reshape(B * K, L), batch["input_mask"].reshape(B * K, L), rng)
    return r.reshape(B, K)


def over_members(fn, members: int):
    """fn(params, *args) → x as (params, *args) → [E, ...]: vmapped over the leading member axis of an
    ensemble's params (members > 1), or x[None] of a single model's (members <= 1: an ensemble of one)."""
    if members > 1:
        return lambda params, *args: jax.vmap(lambda p: fn(p, *args))(params)
    return lambda params, *args: fn(params, *args)[None]


def member_scores(params, model, norm, tokens, input_mask) -> Array:
    """Each member's normalised reward of sequences [N, L] → [E, N] (f32). norm is the RM's reward_norm.json:
    {"gain", "bias"} floats for one RM (E = 1), lists of E for an ensemble ("ensemble_size": E)."""
    raw = over_members(lambda p: sequence_rewards(p, model, tokens, input_mask), norm.get("ensemble_size", 1))(params)
    gain = jnp.asarray(norm["gain"], jnp.float32).reshape(-1, 1)
    bias = jnp.asarray(norm["bias"], jnp.float32).reshape(-1, 1)
    return preference.apply_normalization(raw, gain, bias)


def score_sequences(params, model, norm, tokens, input_mask, aggregate: str = "mean", lcb_coef: float = 1.0) -> Array:
    """The normalised reward of sequences [N, L] → [N]: a single RM's score, or an ensemble's members'
    combined by `aggregate` (preference.aggregate_rewards: mean | lcb | min)."""
    return preference.aggregate_rewards(member_scores(params, model, norm, tokens, input_mask), aggregate, lcb_coef)
