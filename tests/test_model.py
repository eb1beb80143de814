"""The decoder: causality, left padding, KV-cache decoding, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.gpt import HEADS, TransformerLM, init_cache, positions_from_mask
from rlhf_jax.models.layers import ModelConfig

GPT2 = dict()
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=False, use_bias=False)
FAMILIES = {"gpt2": GPT2, "llama_gqa": LLAMA}


def build(family, dtype="float32", **kw):
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=32, dtype=dtype, **{**family, **kw})
    model = TransformerLM(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(
        jax.random.PRNGKey(0), tokens, positions_from_mask(jnp.ones_like(tokens)), jnp.ones_like(tokens), heads=HEADS
    )["params"]
    params = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value")
    )
    return cfg, model, params


def forward(model, params, tokens, mask, **kw):
    return model.apply({"params": params}, tokens, positions_from_mask(mask), mask, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_mask_hides_the_future(family):
    _, model, params = build(FAMILIES[family])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 61)
    mask = jnp.ones_like(tokens)
    t = 5
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 61)
    a = forward(model, params, tokens, mask)["logits"]
    b = forward(model, params, changed, mask)["logits"]
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert np.abs(np.asarray(a[:, t + 1 :] - b[:, t + 1 :])).max() > 1e-3  # the future does matter after t


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_leaves_real_tokens_unchanged(family):
    _, model, params = build(FAMILIES[family])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 9), 4, 61)
    pads = 4
    padded = jnp.concatenate([jnp.zeros((1, pads), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pads), jnp.int32), jnp.ones_like(tokens)], axis=1)
    ref = forward(model, params, tokens, jnp.ones_like(tokens), heads=HEADS)
    got = forward(model, params, padded, mask, heads=HEADS)
    for key in ("logits", "values", "rewards"):
        np.testing.assert_allclose(got[key][:, pads:], ref[key], atol=2e-5, err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(family):
    cfg, model, params = build(FAMILIES[family])
    B, T, prompt = 3, 14, 5
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, T), 4, 61)
    # ragged left padding in the prompt: rows have 0, 2 and 4 pads
    mask = jnp.ones((B, T), jnp.int32).at[1, :2].set(0).at[2, :4].set(0)
    full = forward(model, params, tokens, mask)["logits"]
    positions = positions_from_mask(mask)
    apply = jax.jit(
        lambda tok, pos, cache, i: model.apply({"params": params}, tok, pos, mask, cache=cache, cache_index=i)
    )
    out = apply(tokens[:, :prompt], positions[:, :prompt], init_cache(cfg, B, T), 0)
    steps, cache = [out["logits"]], out["cache"]
    for t in range(prompt, T):
        out = apply(tokens[:, t : t + 1], positions[:, t : t + 1], cache, t)
        steps.append(out["logits"])
        cache = out["cache"]
    inc = jnp.concatenate(steps, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(inc)[real], np.asarray(full)[real], atol=1e-5)


def test_heads_share_one_params_tree():
    _, _, params = build(GPT2)
    assert set(params) == {"trunk", "value_head", "reward_head"}  # tied: no lm_head
    _, _, params = build(LLAMA)
    assert set(params) == {"trunk", "lm_head", "value_head", "reward_head"}
    assert np.all(np.asarray(params["value_head"]["kernel"]) == 0)  # value head starts at zero
    assert np.asarray(params["reward_head"]["kernel"]).std() > 0


def test_bf16_compute_keeps_f32_params_and_logits():
    _, model, params = build(GPT2, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.ones((2, 6), jnp.int32)
    out = forward(model, params, tokens, jnp.ones_like(tokens), heads=HEADS)
    assert out["logits"].dtype == jnp.float32 and out["values"].dtype == jnp.float32
    _, model32, _ = build(GPT2)
    ref = forward(model32, params, tokens, jnp.ones_like(tokens))["logits"]
    np.testing.assert_allclose(out["logits"], ref, atol=5e-2)  # bf16 is close to f32, not equal


def test_dropout_is_random_only_in_training():
    _, model, params = build(GPT2, dropout=0.5)
    tokens = jnp.ones((2, 6), jnp.int32)
    mask = jnp.ones_like(tokens)
    a = forward(model, params, tokens, mask)["logits"]
    b = forward(model, params, tokens, mask)["logits"]
    np.testing.assert_array_equal(a, b)
    c = forward(model, params, tokens, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})["logits"]
    assert np.abs(np.asarray(a - c)).max() > 1e-3


@pytest.mark.parametrize("tied,first", [(True, 0), (False, 11)])
def test_chunked_logprobs_and_entropies_equal_the_dense_ones_and_so_do_their_gradients(tied, first, monkeypatch):
    """forward.token_stats forms the logits a chunk of tokens at a time (recomputed in the backward pass) once
    B · T · V passes LOGITS_PER_CHUNK; its log-probs, entropies and gradients equal those of the model's dense
    [B, T, V] logits. Vocabulary 32,768 (10,000 of them real: a padded vocab), 37 tokens in chunks of 8. With
    `first` (a rollout's prompt length - 1) the LM head runs only from that position on: the dense ones' tail."""
    from rlhf_jax import forward

    cfg = ModelConfig(
        vocab_size=32768,
        token_vocab=10000,
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_len=64,
        tie_embeddings=tied,
        dtype="float32",
    )
    model = TransformerLM(cfg)
    B, T = 4, 37
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 10000)
    mask = jnp.ones_like(tokens).at[0, :5].set(0)  # a left-padded row
    targets = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, 10000)
    p = model.init(jax.random.PRNGKey(0), tokens, positions_from_mask(mask), mask, heads=HEADS)["params"]
    p = jax.tree.map(lambda x: x.value, p, is_leaf=lambda x: hasattr(x, "value"))
    weights = jax.random.normal(jax.random.PRNGKey(3), (B, T - first))

    def dense(params):
        logits = forward.apply(params, model, tokens, mask)["logits"]
        lp, ent = forward.logprobs_from_logits(logits, targets, 0.7), forward.entropy_from_logits(logits, 0.7)
        return lp[:, first:], ent[:, first:]

    def chunked(params):
        out = forward.token_stats(params, model, tokens, mask, targets[:, first:], 0.7, entropy=True, first=first)
        return out["logprobs"], out["entropy"]

    monkeypatch.setattr(forward, "LOGITS_PER_CHUNK", B * cfg.vocab_size * 8)  # 8 tokens a chunk: 5 (or 4) chunks
    (lp_d, ent_d), (lp_c, ent_c) = jax.jit(dense)(p), jax.jit(chunked)(p)  # jitted: one compile, not one per op
    assert lp_c.shape == (B, T - first)
    np.testing.assert_allclose(lp_c, lp_d, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent_c, ent_d, atol=1e-5, rtol=1e-5)
    loss = lambda fn: lambda params: jnp.sum(weights * (fn(params)[0] + fn(params)[1]))
    g_d, g_c = jax.jit(jax.grad(loss(dense)))(p), jax.jit(jax.grad(loss(chunked)))(p)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_d), jax.tree.leaves(g_c)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
    grads = jax.tree.leaves(g_c)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads) and any(np.abs(np.asarray(g)).max() > 0 for g in grads)
    # chunks of one size, as few as fit: 37 tokens at most 8 a chunk are 5 of 8; 63 at most 42 are 2 of 32
    assert forward.token_chunks(T, B * cfg.vocab_size) == (5, 8)
    monkeypatch.setattr(forward, "LOGITS_PER_CHUNK", 42)
    assert forward.token_chunks(63, 1) == (2, 32) and forward.token_chunks(42, 1) == (1, 42)
