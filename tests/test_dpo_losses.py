"""The direct-preference family vs hand-written references of the published formulas (DPO eq. 7 with label
smoothing, IPO, SimPO, Plackett-Luce of the DPO paper's appendix A.3), on random implicit rewards
with ragged rankings; Plackett-Luce at K = 2 is DPO; SimPO's length normalisation counts response tokens
only; padded responses and tokens never contribute."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import forward, preference
from rlhf_jax.models.gpt import HEADS, TransformerLM
from rlhf_jax.models.layers import ModelConfig
from tests.test_preference import RAGGED_VALID, _log_sigmoid, _rewards


def _pairwise_reference(rho, valid, per_pair, pairs="all"):
    """Per prompt, the mean of per_pair(ρ_i − ρ_j) over its compared pairs; then the mean over prompts."""
    out = []
    for row, v in zip(np.asarray(rho, np.float64), valid):
        idx = [k for k in range(len(row)) if v[k]]
        if len(idx) < 2:
            continue
        compared = list(itertools.combinations(idx, 2)) if pairs == "all" else [(idx[0], idx[-1])]
        out.append(np.mean([per_pair(row[i] - row[j]) for i, j in compared]))
    return np.mean(out)


def _pl_reference(rho, valid, beta):
    """−Σ_k log( exp(βρ_k) / Σ_{j ≥ k} exp(βρ_j) ) over each prompt's valid responses (best first)."""
    out = []
    for row, v in zip(np.asarray(rho, np.float64), valid):
        s = [beta * row[k] for k in range(len(row)) if v[k]]
        if len(s) < 2:
            continue
        out.append(-sum(s[k] - np.log(np.sum(np.exp(s[k:]))) for k in range(len(s) - 1)))
    return np.mean(out)


BETA = 0.3


@pytest.mark.parametrize(
    "loss, eps, gamma, pairs",
    [
        ("dpo", 0.0, 0.0, "all"),
        ("dpo", 0.1, 0.0, "all"),
        ("dpo", 0.0, 0.0, "best_worst"),
        ("ipo", 0.0, 0.0, "all"),
        ("simpo", 0.0, 0.5, "all"),
    ],
)
def test_pairwise_losses_match_their_formulas(loss, eps, gamma, pairs):
    rho = _rewards(RAGGED_VALID.shape, seed=1)
    per_pair = {
        "dpo": lambda m: -(1 - eps) * _log_sigmoid(BETA * m) - eps * _log_sigmoid(-BETA * m),
        "ipo": lambda m: (m - 1 / (2 * BETA)) ** 2,
        "simpo": lambda m: -_log_sigmoid(BETA * m - gamma),
    }[loss]
    got, stats = jax.jit(preference.dpo_family_loss, static_argnums=(2, 3, 4, 5, 6))(
        rho, RAGGED_VALID, loss, BETA, eps, gamma, pairs
    )
    np.testing.assert_allclose(got, _pairwise_reference(rho, RAGGED_VALID, per_pair, pairs), rtol=1e-5)
    assert float(stats["num_examples"]) == 4  # the prompt with one response has no pair
    assert float(stats["num_pairs"]) == (6 + 3 + 1 + 6 if pairs == "all" else 4)


def test_plackett_luce_matches_its_formula_and_equals_dpo_at_k2():
    rho = _rewards(RAGGED_VALID.shape, seed=2)
    got, _ = preference.dpo_family_loss(rho, RAGGED_VALID, "plackett_luce", BETA)
    np.testing.assert_allclose(got, _pl_reference(rho, RAGGED_VALID, BETA), rtol=1e-5)
    two = _rewards((6, 2), seed=3)
    v2 = np.ones((6, 2), np.int32)
    pl, _ = preference.dpo_family_loss(two, v2, "plackett_luce", BETA)
    dpo, _ = preference.dpo_family_loss(two, v2, "dpo", BETA)
    np.testing.assert_allclose(pl, dpo, rtol=1e-6)
    # and so is a K-way ranking whose every prompt has exactly two valid responses
    v = np.array([[1, 1, 0, 0]] * 6, np.int32)
    four = np.concatenate([two, _rewards((6, 2), seed=4)], axis=1)
    np.testing.assert_allclose(preference.dpo_family_loss(four, v, "plackett_luce", BETA)[0], dpo, rtol=1e-6)


def test_plackett_luce_uses_the_order_below_the_top_and_pairwise_dpo_does_not_on_best_worst():
    # Swapping the two middle responses changes a K = 4 ranking's likelihood, not its best-vs-worst pair.
    rho = _rewards((3, 4), seed=5)
    swapped = rho[:, [0, 2, 1, 3]]
    v = np.ones((3, 4), np.int32)
    pl = [float(preference.dpo_family_loss(x, v, "plackett_luce", BETA)[0]) for x in (rho, swapped)]
    bw = [float(preference.dpo_family_loss(x, v, "dpo", BETA, pairs="best_worst")[0]) for x in (rho, swapped)]
    assert pl[0] != pytest.approx(pl[1]) and bw[0] == pytest.approx(bw[1])


@pytest.mark.parametrize("loss", preference.DPO_LOSSES)
def test_padded_responses_never_reach_a_loss_or_its_gradient(loss):
    rho = _rewards(RAGGED_VALID.shape, seed=6)
    junk = np.where(RAGGED_VALID == 0, np.float32(np.nan), rho)
    clean, _ = preference.dpo_family_loss(rho, RAGGED_VALID, loss, BETA, gamma=0.5)
    dirty, _ = preference.dpo_family_loss(junk, RAGGED_VALID, loss, BETA, gamma=0.5)
    assert float(clean) == pytest.approx(float(dirty), rel=1e-6)
    g = jax.grad(lambda r: preference.dpo_family_loss(r, RAGGED_VALID, loss, BETA, gamma=0.5)[0])(jnp.asarray(junk))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[RAGGED_VALID == 0] == 0)
    assert np.any(np.asarray(g)[RAGGED_VALID != 0] != 0)


def test_bad_settings_are_named():
    rho, v = _rewards((2, 2)), np.ones((2, 2), np.int32)
    with pytest.raises(ValueError, match="dpo.loss='kto' is unknown"):
        preference.dpo_family_loss(rho, v, "kto", BETA)
    with pytest.raises(ValueError, match="dpo.pairs='random' is unknown"):
        preference.dpo_family_loss(rho, v, "dpo", BETA, pairs="random")


# --- implicit rewards from the model: response tokens only -----------------------------------------------------------


def _model():
    model = TransformerLM(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_len=16, dtype="float32"))
    t = jnp.ones((1, 4), jnp.int32)
    params = jax.jit(
        lambda: __import__("flax").linen.unbox(model.init(jax.random.PRNGKey(0), t, t, t, heads=HEADS)["params"])
    )()
    return model, params


def test_comparison_logprobs_sum_the_response_tokens_given_the_prompt_and_count_only_them():
    model, params = _model()
    # one prompt of 4 tokens, K = 2 responses of 3 and 1 tokens, right-padded to L = 9
    tokens = np.array([[[2, 5, 6, 7, 11, 12, 13, 0, 0], [2, 5, 6, 7, 14, 0, 0, 0, 0]]], np.int32)
    mask = (tokens != 0).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "input_mask": jnp.asarray(mask), "prompt_len": jnp.asarray([4])}
    logps, lengths = forward.comparison_logprobs(params, model, batch)
    np.testing.assert_array_equal(lengths, [[3, 1]])
    for k, n in enumerate((3, 1)):
        row = tokens[0, k][None, : 4 + n]
        logits = np.asarray(
            model.apply({"params": params}, jnp.asarray(row), jnp.arange(4 + n)[None], jnp.ones_like(row))["logits"],
            np.float64,
        )[0]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        want = sum(logp[t - 1, row[0, t]] for t in range(4, 4 + n))  # response tokens only, each given its past
        np.testing.assert_allclose(logps[0, k], want, rtol=1e-4)
    # SimPO divides by those lengths: the prompt's 4 tokens never count
    rho = preference.implicit_rewards("simpo", logps, None, lengths)
    np.testing.assert_allclose(rho, np.asarray(logps) / np.array([[3.0, 1.0]]), rtol=1e-6)
    # what sits in the padding changes nothing
    junk = np.where(mask == 0, 17, tokens)
    again, _ = forward.comparison_logprobs(params, model, {**batch, "tokens": jnp.asarray(junk)})
    np.testing.assert_allclose(again, logps, rtol=1e-6)


def test_a_batch_cut_to_the_bucket_of_its_longest_row_scores_as_the_padded_one():
    """config.data.length_bucket: the DPO stage cuts each batch to the smallest width of the bucket's half-octave
    grid (rollout.bucket_width) holding its longest row (the comparisons' padding to data.seq_len is never
    scored), and the log-probs do not change."""
    from rlhf_jax import comparison_data

    model, params = _model()
    rng = np.random.default_rng(0)
    lengths = np.array([[9, 5], [3, 7]])  # the longest row: 9 of L = 16 tokens
    tokens = rng.integers(1, 30, (2, 2, 16)).astype(np.int32)
    mask = (np.arange(16) < lengths[..., None]).astype(np.int32)
    local = {"tokens": tokens * mask, "input_mask": mask, "prompt_len": np.array([2, 2], np.int32)}
    for unchanged in (0, 16):  # 0: never cut; 16 holds 9 as it is
        assert comparison_data.trimmed(local, unchanged)["tokens"].shape[-1] == 16
    assert comparison_data.trimmed(local, 8)["tokens"].shape[-1] == 12  # 8 → 12 holds 9
    cut = comparison_data.trimmed(local, 5)  # 5 → 7 → 10 holds 9
    assert cut["tokens"].shape == cut["input_mask"].shape == (2, 2, 10) and cut["prompt_len"] is local["prompt_len"]
    full_lp, full_n = forward.comparison_logprobs(params, model, {k: jnp.asarray(v) for k, v in local.items()})
    cut_lp, cut_n = forward.comparison_logprobs(params, model, {k: jnp.asarray(v) for k, v in cut.items()})
    np.testing.assert_array_equal(cut_n, full_n)
    np.testing.assert_allclose(cut_lp, full_lp, rtol=1e-6, atol=1e-6)


def test_the_lm_head_runs_at_the_response_positions_only_and_changes_nothing():
    """comparison_data.trimmed lists each row's response positions ("response_at": the positions whose next
    token is a response token, then -1, as many as the bucket of the longest response); the log-prob sums, the
    lengths and their gradients equal those of the LM head over every position (prompts of different lengths,
    a response of one token, a padding row with none)."""
    from rlhf_jax import comparison_data

    model, params = _model()
    rng = np.random.default_rng(1)
    prompt_len = np.array([5, 2, 3], np.int32)
    lengths = np.array([[9, 6], [3, 11], [3, 3]])  # row (2, *): a padding record's rows, no response token
    tokens = rng.integers(1, 30, (3, 2, 16)).astype(np.int32)
    mask = (np.arange(16) < lengths[..., None]).astype(np.int32)
    local = {"tokens": tokens * mask, "input_mask": mask, "prompt_len": prompt_len}
    cut = comparison_data.trimmed(local, 4)
    # width 12 (4 → 6 → 8 → 12 holds 11); the longest response, 9 tokens, at most 11 positions (12 holds 9)
    assert cut["tokens"].shape[-1] == 12 and cut["response_at"].shape == (3, 2, 11)
    np.testing.assert_array_equal(cut["response_at"][0, 0], [4, 5, 6, 7] + [-1] * 7)  # tokens 5..8 are targets
    np.testing.assert_array_equal(cut["response_at"][1, 1], list(range(1, 10)) + [-1, -1])  # tokens 2..10
    assert (cut["response_at"][2] == -1).all()
    short = comparison_data.trimmed({**local, "prompt_len": np.array([8, 9, 3], np.int32)}, 4)
    assert short["response_at"].shape == (3, 2, 4)  # responses of at most 3 tokens: the LM head at 4 positions
    dense = {k: jnp.asarray(v) for k, v in cut.items() if k != "response_at"}
    sparse = {**dense, "response_at": jnp.asarray(cut["response_at"])}
    for batch in (sparse, {**sparse, "response_at": sparse["response_at"][..., :9]}):  # a bucket of 9: the same
        (lp, n), (want_lp, want_n) = (forward.comparison_logprobs(params, model, b) for b in (batch, dense))
        np.testing.assert_array_equal(n, want_n)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-6, atol=1e-6)
    weights = jnp.arange(1.0, 7.0).reshape(3, 2)
    total = lambda b: lambda p: jnp.sum(forward.comparison_logprobs(p, model, b)[0] * weights)
    g, want = jax.grad(total(sparse))(params), jax.grad(total(dense))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, want)
