"""Sampling with the KV cache: greedy equals step-by-step full recompute; EOS, padding, filters."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.gpt import HEADS, TransformerLM, positions_from_mask
from rlhf_jax.models.layers import ModelConfig
from rlhf_jax.sampling import SamplingSettings, filter_logits, sample

CFG = ModelConfig(
    vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_len=32, dtype="float32", position="rope", n_kv_heads=2
)
MODEL = TransformerLM(CFG)


def params():
    t = jnp.ones((1, 4), jnp.int32)
    p = MODEL.init(jax.random.PRNGKey(0), t, positions_from_mask(t), t, heads=HEADS)["params"]
    return jax.tree.map(lambda x: x.value, p, is_leaf=lambda x: hasattr(x, "value"))


def run(p, tokens, mask, settings, seed=0):
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), tokens.shape[0]))
    fn = jax.jit(functools.partial(sample, model=MODEL, settings=settings))
    return jax.device_get(fn(p, tokens, mask, keys))


def greedy_reference(p, prompt, n):
    """Argmax decoding by recomputing the full forward pass each step (no cache). The sequence lives in a
    fixed-length buffer so one compilation serves every step; causality makes the unused tail irrelevant."""
    L = len(prompt) + n
    full = jax.jit(
        lambda t: MODEL.apply({"params": p}, t, positions_from_mask(jnp.ones_like(t)), jnp.ones_like(t))["logits"]
    )
    seq = list(prompt) + [0] * n
    for i in range(len(prompt), L):
        logits = full(jnp.asarray([seq], jnp.int32))
        seq[i] = int(jnp.argmax(logits[0, i - 1]))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_full_recompute_and_ignores_left_pads():
    p = params()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    P = 5
    tokens = np.zeros((2, P), np.int32)
    mask = np.zeros((2, P), np.int32)
    for i, pr in enumerate(prompts):
        tokens[i, P - len(pr) :] = pr
        mask[i, P - len(pr) :] = 1
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=-1)
    out = run(p, tokens, mask, settings)
    for i, pr in enumerate(prompts):
        assert out["tokens"][i].tolist() == greedy_reference(p, pr, 6)
    assert out["mask"].all()


def test_eos_ends_a_sample_and_pads_the_rest():
    p = params()
    tokens = jnp.asarray([[5, 6, 7]] * 4, jnp.int32)
    mask = jnp.ones_like(tokens)
    greedy = run(p, tokens, mask, SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=-1))["tokens"][0]
    eos = int(greedy[2])  # make the 3rd greedy token the EOS
    out = run(p, tokens, mask, SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=0))
    first = list(greedy).index(eos)
    assert out["tokens"][0, : first + 1].tolist() == greedy[: first + 1].tolist()
    assert (out["tokens"][0, first + 1 :] == 0).all()
    assert out["mask"][0].tolist() == [1] * (first + 1) + [0] * (6 - first - 1)


def test_per_sample_keys_make_samples_independent_of_batch_mates():
    p = params()
    tokens = jnp.asarray([[5, 6, 7], [9, 9, 9]], jnp.int32)
    s = SamplingSettings(max_new_tokens=8, temperature=1.0, eos_id=-1)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(3), 2))
    fn = jax.jit(functools.partial(sample, model=MODEL, settings=s))
    both = fn(p, tokens, jnp.ones_like(tokens), keys)["tokens"]
    alone = fn(p, tokens[:1], jnp.ones_like(tokens[:1]), keys[:1])["tokens"]
    np.testing.assert_array_equal(both[0], alone[0])


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: (np.asarray(x) > -1e30).astype(int).tolist()[0]
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [1, 1, 0, 0]
    assert kept(filter_logits(logits, top_k=0, top_p=0.7)) == [1, 1, 0, 0]  # 0.5 < 0.7 ≤ 0.8
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == [1, 0, 0, 0]
    assert kept(filter_logits(logits, top_k=0, top_p=0.96)) == [1, 1, 1, 1]


def test_temperature_sampling_matches_the_distribution():
    logits = jnp.tile(jnp.log(jnp.asarray([[0.6, 0.3, 0.1]])), (20000, 1))
    from rlhf_jax.sampling import sample_token

    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    toks = np.asarray(sample_token(logits, keys, SamplingSettings(temperature=1.0)))
    freq = np.bincount(toks, minlength=3) / len(toks)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)


def test_filtered_tokens_are_never_drawn():
    """Zero-probability entries (first, middle, last) are skipped; the rest keep their proportions."""
    from rlhf_jax.sampling import sample_token

    probs = jnp.asarray([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])
    logits = jnp.tile(jnp.where(probs > 0, jnp.log(probs), jnp.finfo(jnp.float32).min), (20000, 1))
    keys = jax.random.split(jax.random.PRNGKey(1), 20000)
    toks = np.asarray(sample_token(logits, keys, SamplingSettings(temperature=1.0, top_k=3)))
    freq = np.bincount(toks, minlength=6) / len(toks)
    assert freq[0] == freq[2] == freq[5] == 0.0
    np.testing.assert_allclose(freq, [0, 0.5, 0, 0.25, 0.25, 0], atol=0.015)


def test_eos_before_eos_after_does_not_end_the_sample():
    """lm-human-preferences' truncate_after: a stop token before index N is an ordinary token."""
    p = params()
    tokens = jnp.asarray([[5, 6, 7]], jnp.int32)
    mask = jnp.ones_like(tokens)
    greedy = run(p, tokens, mask, SamplingSettings(max_new_tokens=8, temperature=0.0, eos_id=-1))["tokens"][0]
    eos = int(greedy[0])
    early = run(p, tokens, mask, SamplingSettings(max_new_tokens=8, temperature=0.0, eos_id=eos))
    assert early["mask"][0].sum() == 1 and early["ended"][0]
    late = run(p, tokens, mask, SamplingSettings(max_new_tokens=8, temperature=0.0, eos_id=eos, eos_after=1))
    later = [i for i, t in enumerate(greedy) if t == eos and i >= 1]
    expected = later[0] + 1 if later else 8
    assert late["mask"][0].sum() == expected and bool(late["ended"][0]) == bool(later)


def test_stopping_once_every_sample_ended_gives_the_full_loops_tokens():
    """Decoding in chunks inside a while_loop that stops when every row has ended (stop_check_every) draws
    exactly the tokens, masks and log-probs of the full-length scan for the same keys: with a last chunk
    shorter than the others (13 = 3 × 4 + 1), with rows still running at the end, and with every row ending
    in the first chunk."""
    p = params()
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (16, 5)), jnp.int32)
    mask = jnp.ones_like(tokens)
    greedy = run(p, tokens[:1], mask[:1], SamplingSettings(max_new_tokens=4, temperature=0.0, eos_id=-1))["tokens"]
    cases = [
        (tokens, SamplingSettings(max_new_tokens=13, temperature=1.0, eos_id=7, logprobs=True)),
        # every row: the first prompt, greedy, whose 2nd token is the EOS: all done after 2 of 13 steps
        (jnp.repeat(tokens[:1], 4, 0), SamplingSettings(max_new_tokens=13, temperature=0.0, eos_id=int(greedy[0, 1]))),
    ]
    for toks, s in cases:
        full = run(p, toks, jnp.ones_like(toks), dataclasses.replace(s, stop_check_every=0), seed=1)
        for every in (4, 5, 13):
            chunked = run(p, toks, jnp.ones_like(toks), dataclasses.replace(s, stop_check_every=every), seed=1)
            assert set(chunked) == set(full)
            for k in full:
                np.testing.assert_array_equal(chunked[k], full[k], err_msg=f"{k}, stop_check_every={every}")
    assert full["ended"].all() and full["mask"][:, 2:].sum() == 0
    assert not run(p, tokens, mask, cases[0][1], seed=1)["ended"].all()  # the sampled case has rows still running


def test_bf16_weights_for_sampling_draw_the_same_tokens():
    """inference_params keeps a bf16-policy sampler's weight matrices in bf16 (norms, the embedding table and the
    scalar heads as they were): the draws, their log-probs and the ends are exactly those of the f32 weights."""
    from rlhf_jax.sampling import inference_params

    model = TransformerLM(dataclasses.replace(CFG, dtype="bfloat16"))
    p = params()
    cast = inference_params(p, model.cfg)
    assert cast["trunk"]["block_0"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16
    assert cast["trunk"]["block_0"]["attn"]["out"].dtype == jnp.bfloat16
    assert cast["trunk"]["embed"].dtype == cast["trunk"]["block_0"]["norm_attn"]["scale"].dtype == jnp.float32
    assert cast["value_head"]["kernel"].dtype == cast["reward_head"]["kernel"].dtype == jnp.float32
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, inference_params(p, CFG), p))  # f32: untouched
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (8, 5)), jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(3), 8))
    s = SamplingSettings(max_new_tokens=10, temperature=1.0, eos_id=7, logprobs=True)
    fn = jax.jit(functools.partial(sample, model=model, settings=s))
    full, half = (jax.device_get(fn(w, tokens, jnp.ones_like(tokens), keys)) for w in (p, cast))
    for k in full:
        np.testing.assert_array_equal(half[k], full[k], err_msg=k)


def test_the_prompt_costs_the_sampler_no_logits():
    """The LM head runs on the prompt's last position only: the compiled sampler's temporaries stay under what
    the prompt's full logits [B, P, V] alone would take."""
    cfg = dataclasses.replace(CFG, vocab_size=4096, max_len=96)
    model = TransformerLM(cfg)
    t = jnp.ones((1, 4), jnp.int32)
    p = nn.unbox(model.init(jax.random.PRNGKey(0), t, positions_from_mask(t), t)["params"])
    B, P = 8, 64
    tokens = jnp.ones((B, P), jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0), B))
    s = SamplingSettings(max_new_tokens=4, temperature=1.0, eos_id=-1)
    fn = jax.jit(functools.partial(sample, model=model, settings=s))
    temp = fn.lower(p, tokens, jnp.ones_like(tokens), keys).compile().memory_analysis().temp_size_in_bytes
    assert temp < B * P * cfg.vocab_size * 4 / 2, temp
