"""Sampling with a KV cache: prefill the (left-padded) prompts, then one token at a time in `lax.scan`.

Jit it with `jax.jit(functools.partial(sample, model=..., settings=...))`; it
runs on sharded params and a batch sharded over the data axes like any step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.forward import lm_head
from rlhf_jax.models.gpt import TransformerLM, init_cache, positions_from_mask
from rlhf_jax.models.layers import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    eos_id: int = 3
    pad_id: int = 0
    # An EOS before this many new tokens does not end the sample (lm-human-preferences' `truncate_after`).
    eos_after: int = 0
    # Also return each drawn token's log-prob (an extra logsumexp over the vocabulary per step).
    logprobs: bool = False
    # Decode in chunks of this many tokens and stop once every sequence has ended (checked on device between
    # chunks, inside a while_loop); 0: always decode max_new_tokens. Either gives the same tokens.
    stop_check_every: int = 8


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) to -inf; always keeps the best token."""
    logits = logits_BxV.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_token(logits_BxV, keys_B, settings: SamplingSettings):
    if settings.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BxV / settings.temperature, settings.top_k, settings.top_p)
    return sample_inverse_cdf(logits, keys_B)


def sample_inverse_cdf(logits_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): the first token whose cumulative probability exceeds
    u ~ U[0, total). One uniform per row instead of `jax.random.categorical`'s V Gumbel draws, which
    dominated the decoding step on CPU. Tokens of probability 0 (filtered out) are never drawn."""
    cdf = jnp.cumsum(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1)
    u = jax.vmap(jax.random.uniform)(keys_B)[:, None] * cdf[:, -1:]
    idx = jnp.sum(cdf <= u, axis=-1)
    # u rounds up to the total only with probability ~2^-24; then take the last token of nonzero mass.
    return jnp.where(idx >= cdf.shape[-1], jnp.argmax(cdf, axis=-1), idx).astype(jnp.int32)


def example_keys(seed: int, index) -> np.ndarray:
    """uint32 [len(index), 2]: example i's sampling key, fold_in(PRNGKey(seed), i), so that a sample depends on
    its own index and not on its batch-mates, the batch size or the topology."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(jnp.asarray(index)))


def inference_params(params, cfg: ModelConfig):
    """`params` as a sampler that keeps no training copy should hold them: the weight matrices the model reads
    only through `cfg.dtype` matmuls in that dtype; norms, biases, the scalar heads and the embedding tables as
    they are. The same tokens come out (a bf16 matmul rounds its f32 weights to bf16 anyway) from about half
    the memory: in the bf16 policy a jitted sampler given f32 weights holds a bf16 copy of them beside the
    originals for the whole decode (263 MB of SmolLM2's 513). The tables stay: XLA:CPU gathers from a bf16
    table by first converting all of it to f32, a copy the decoding loop would keep. Identity in f32."""
    dt = cfg.compute_dtype

    def cast(path, x):
        names = {getattr(k, "key", None) for k in path}
        kept = names & {"value_head", "reward_head", "embed", "pos_embed"}
        return x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 and not kept else x

    return jax.tree_util.tree_map_with_path(cast, params)


def sample(params, prompt_tokens, prompt_mask, rng_keys, *, model: TransformerLM, settings: SamplingSettings):
    """Generates up to `max_new_tokens` per prompt.

    prompt_tokens, prompt_mask: int32 [B, P], left-padded (real tokens at the right end).
    rng_keys: uint32 [B, 2], one key per sample, so a sample does not depend on its batch-mates.
    Returns {"tokens": int32 [B, N] (pad after EOS), "mask": int32 [B, N] (1 up to and including EOS),
             "ended": bool [B] (an EOS was sampled)}, and with settings.logprobs "logprobs" f32 [B, N]:
    each token's log-prob as the sampler drew it, under softmax(logits / temperature) before top-k /
    top-p (temperature 1 when greedy), 0 after EOS. A trainer recomputes these with a full forward;
    the two should agree to float precision, and the PPO stage logs their gap (sampler/logprob_gap).
    """
    B, P = prompt_tokens.shape
    N = settings.max_new_tokens
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, N), prompt_mask.dtype)], axis=1)
    positions = positions_from_mask(prompt_mask)
    # The LM head runs at the last position only: the prompt's other logits are never drawn from, and at
    # SmolLM2's 49,152-token vocabulary they would be the program's largest buffer (201 MB at batch 64).
    head = lm_head(params, model)
    out = model.apply(
        {"params": params},
        prompt_tokens,
        positions,
        key_mask,
        cache=init_cache(model.cfg, B, P + N),
        cache_index=0,
        heads=(),
    )
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # position of the first new token
    keys = jax.vmap(jax.random.wrap_key_data)(rng_keys)

    def body(carry, i):
        cache, logits, done = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        token = sample_token(logits, step_keys, settings)
        token = jnp.where(done, settings.pad_id, token)
        live = ~done
        logprob = 0.0
        if settings.logprobs:
            scaled = logits.astype(jnp.float32) / (settings.temperature or 1.0)
            logprob = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
        done = done | ((token == settings.eos_id) & (i >= settings.eos_after))
        o = model.apply(
            {"params": params},
            token[:, None],
            (next_pos + i)[:, None],
            key_mask,
            cache=cache,
            cache_index=P + i,
            heads=(),
        )
        return (o["cache"], head(o["hidden"])[:, -1], done), (token, live, jnp.where(live, logprob, 0.0))

    init = (out["cache"], head(out["hidden"][:, -1:])[:, -1], jnp.zeros((B,), bool))
    C = settings.stop_check_every
    if not 0 < C < N:
        (_, _, done), (tokens, live, logprobs) = jax.lax.scan(body, init, jnp.arange(N))
    else:
        (_, _, done), (tokens, live, logprobs) = _decode_until_done(body, init, N, C, settings.pad_id, B)
    out = {"tokens": tokens.T, "mask": live.T.astype(jnp.int32), "ended": done}
    if settings.logprobs:
        out["logprobs"] = logprobs.T
    return out


def _decode_until_done(body, init, N: int, C: int, pad_id: int, B: int):
    """`lax.scan(body, init, arange(N))`'s result, decoding C steps at a time and stopping once every row is
    done: the steps left would only emit (pad, not live, 0) rows, which the outputs start as."""
    outs = (jnp.full((N, B), pad_id, jnp.int32), jnp.zeros((N, B), bool), jnp.zeros((N, B), jnp.float32))

    def chunk(carry, outs, start, length):
        carry, ys = jax.lax.scan(body, carry, start + jnp.arange(length))
        return carry, tuple(jax.lax.dynamic_update_slice(o, y, (start, 0)) for o, y in zip(outs, ys))

    def cond(state):
        j, (_, _, done), _ = state
        return (j < N // C) & ~jnp.all(done)

    def step(state):
        j, carry, outs = state
        return (j + 1, *chunk(carry, outs, j * C, C))

    _, carry, outs = jax.lax.while_loop(cond, step, (jnp.int32(0), init, outs))
    if N % C:  # the last, shorter chunk
        carry, outs = jax.lax.cond(
            jnp.all(carry[2]), lambda c, o: (c, o), lambda c, o: chunk(c, o, (N // C) * C, N % C), carry, outs
        )
    return carry, outs
