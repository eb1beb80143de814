"""Preference losses equal hand-written references: InstructGPT's ranking loss with its 1/C(K,2)
weighting, best-of-K cross-entropy, pairwise accuracy, and reward normalisation."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import preference


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _ranking_reference(r, valid, margin=0.0):
    """Per prompt: -1/C(n,2) Σ_{i<j} log σ(r_i - r_j - margin) over its valid responses; batch mean."""
    losses = []
    for row, v in zip(r, valid):
        idx = [k for k in range(len(row)) if v[k]]
        if len(idx) < 2:
            continue
        terms = [_log_sigmoid(row[i] - row[j] - margin) for i, j in itertools.combinations(idx, 2)]
        losses.append(-sum(terms) / math.comb(len(idx), 2))
    return np.mean(losses)


RAGGED_VALID = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.int32)


def _rewards(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def test_ranking_loss_k2_matches_reference():
    r = _rewards((6, 2))
    valid = np.ones((6, 2), np.int32)
    for margin in (0.0, 0.5):
        loss, stats = jax.jit(preference.ranking_loss)(r, valid, margin)
        np.testing.assert_allclose(loss, _ranking_reference(r, valid, margin), rtol=1e-5)
        assert stats["num_pairs"] == 6 and stats["num_examples"] == 6
    # K=2: the loss is -mean log σ(r_chosen - r_rejected), the Bradley-Terry likelihood.
    np.testing.assert_allclose(
        preference.ranking_loss(r, valid)[0], -np.mean(_log_sigmoid(r[:, 0] - r[:, 1])), rtol=1e-5
    )


def test_ranking_loss_k4_ragged_matches_reference():
    r = _rewards((5, 4), seed=1)
    loss, stats = preference.ranking_loss(r, RAGGED_VALID, margin=0.25)
    np.testing.assert_allclose(loss, _ranking_reference(r, RAGGED_VALID, 0.25), rtol=1e-5)
    assert stats["num_pairs"] == 6 + 3 + 1 + 0 + 6
    assert stats["num_examples"] == 4  # the prompt with one valid response is left out of the mean


def test_ranking_loss_ignores_what_padding_holds():
    r = _rewards((5, 4), seed=2)
    garbage = np.where(RAGGED_VALID > 0, r, np.nan).astype(np.float32)
    loss, grads = jax.value_and_grad(lambda x: preference.ranking_loss(x, RAGGED_VALID)[0])(garbage)
    np.testing.assert_allclose(loss, preference.ranking_loss(r, RAGGED_VALID)[0], rtol=1e-6)
    assert np.all(np.isfinite(grads)) and np.all(grads[RAGGED_VALID == 0] == 0)


def test_k4_gradient_equals_six_pairwise_losses_each_weighted_one_sixth():
    r = jnp.asarray(_rewards((4,), seed=3))
    pairs = list(itertools.combinations(range(4), 2))

    def as_k4(x):
        return preference.ranking_loss(x[None], jnp.ones((1, 4), jnp.int32))[0]

    def as_pairs(x):  # six K=2 prompts; the batch mean weights each by 1/6
        two = jnp.stack([jnp.stack([x[i], x[j]]) for i, j in pairs])
        return preference.ranking_loss(two, jnp.ones((6, 2), jnp.int32))[0]

    grad_k4 = jax.grad(as_k4)(r)
    np.testing.assert_allclose(as_k4(r), as_pairs(r), rtol=1e-6)
    np.testing.assert_allclose(grad_k4, jax.grad(as_pairs)(r), rtol=1e-5, atol=1e-7)
    # By hand: pair (i, j) adds -σ(r_j - r_i)/6 to ∂/∂r_i and +σ(r_j - r_i)/6 to ∂/∂r_j.
    x = np.asarray(r, np.float64)
    expected = np.zeros(4)
    for i, j in pairs:
        g = 1 / (1 + np.exp(x[i] - x[j])) / 6
        expected[i] -= g
        expected[j] += g
    np.testing.assert_allclose(grad_k4, expected, rtol=1e-5, atol=1e-7)


def test_ranking_loss_is_stable_for_large_gaps():
    r = np.array([[-1000.0, 1000.0], [1000.0, -1000.0]], np.float32)
    loss, _ = preference.ranking_loss(r, np.ones((2, 2), np.int32))
    np.testing.assert_allclose(loss, 1000.0, rtol=1e-6)  # mean of 2000 and ~0
    assert np.all(np.isfinite(jax.grad(lambda x: preference.ranking_loss(x, np.ones((2, 2)))[0])(r)))


def test_best_of_k_matches_reference():
    r = _rewards((5, 4), seed=4)
    garbage = np.where(RAGGED_VALID > 0, r, np.nan).astype(np.float32)
    loss, stats = jax.jit(preference.best_of_k_loss)(garbage, RAGGED_VALID)
    expected = []
    for row, v in zip(r, RAGGED_VALID):
        if v.sum() < 2:
            continue
        z = row[v > 0].astype(np.float64)
        expected.append(-(z[0] - np.log(np.sum(np.exp(z)))))
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    assert stats["num_examples"] == 4
    grads = jax.grad(lambda x: preference.best_of_k_loss(x, RAGGED_VALID)[0])(garbage)
    assert np.all(np.isfinite(grads)) and np.all(grads[RAGGED_VALID == 0] == 0)
    # K=2 best-of-K is the pairwise loss: softmax over two is σ of the difference.
    two = r[:, :2]
    np.testing.assert_allclose(
        preference.best_of_k_loss(two, np.ones((5, 2)))[0], preference.ranking_loss(two, np.ones((5, 2)))[0], rtol=1e-5
    )


def test_centering_penalty_is_mean_square_of_valid_rewards():
    r = _rewards((5, 4), seed=5)
    got = preference.centering_penalty(np.where(RAGGED_VALID > 0, r, np.inf), RAGGED_VALID, 0.01)
    np.testing.assert_allclose(got, 0.01 * np.mean(r[RAGGED_VALID > 0] ** 2), rtol=1e-5)


def test_pairwise_accuracy_matches_a_loop_with_ties_as_half():
    r = np.round(_rewards((5, 4), seed=6))  # rounding makes ties
    r[0, 1] = r[0, 0]
    right = total = 0.0
    for row, v in zip(r, RAGGED_VALID):
        for i, j in itertools.combinations(range(4), 2):
            if v[i] and v[j]:
                total += 1
                right += 1.0 if row[i] > row[j] else 0.5 if row[i] == row[j] else 0.0
    np.testing.assert_allclose(jax.jit(preference.pairwise_accuracy)(r, RAGGED_VALID), right / total, rtol=1e-6)
    assert np.isnan(preference.pairwise_accuracy(r[:1, :1], np.ones((1, 1))))  # no pair to judge


def test_comparison_metrics():
    r = _rewards((5, 4), seed=7)
    m = preference.comparison_metrics(r, RAGGED_VALID)
    keep = RAGGED_VALID.sum(1) >= 2
    chosen = r[keep, 0]
    rejected = np.array([row[1:][v[1:] > 0].mean() for row, v in zip(r[keep], RAGGED_VALID[keep])])
    np.testing.assert_allclose(m["chosen_reward"], chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rejected_reward"], rejected.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["margin"], (chosen - rejected).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["accuracy"], preference.pairwise_accuracy(r, RAGGED_VALID))


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (7.0, -3.0), (0.1, 5.0)])
def test_normalization_gives_mean_zero_std_one(scale, shift):
    r = jnp.asarray(_rewards((1000,), seed=8) * scale + shift)
    gain, bias = preference.normalization_from_rewards(r)
    out = np.asarray(preference.apply_normalization(r, gain, bias), np.float64)
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1.0) < 1e-4
    gain, bias = preference.normalization_from_rewards(r, target_mean=2.0, target_std=0.5)
    out = np.asarray(preference.apply_normalization(r, gain, bias), np.float64)
    assert abs(out.mean() - 2.0) < 1e-4 and abs(out.std() - 0.5) < 1e-4


def test_normalization_of_equal_rewards_is_finite():
    gain, bias = preference.normalization_from_rewards(jnp.full((8,), 3.0))
    assert np.isfinite(gain) and np.isfinite(bias)
    np.testing.assert_allclose(preference.apply_normalization(jnp.full((8,), 3.0), gain, bias), 0.0, atol=1e-6)
