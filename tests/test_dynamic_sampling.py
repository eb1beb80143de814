"""DAPO's dynamic sampling (rlhf_jax/dynamic_sampling.py): groups whose scores are all equal never reach the
update, the batch keeps its shape (topped up with dropped groups only when the draws run out), the metric is
the share dropped, and a tiny GRPO run with it on learns."""

import jax.numpy as jnp
import numpy as np
import pytest

import configs.grpo as grpo_cfg
import configs.ppo as ppo_cfg
from rlhf_jax import dynamic_sampling
from rlhf_jax.metrics import read_metrics
from rlhf_jax.rewards import Scores
from rlhf_jax.rollout import Rollout
from rlhf_jax.stages import pg
from tests.helpers import by_step, tiny
from tests.test_pg_stage import even_token_share

G = 2


def draw_of(scores, prompt_width, response_width, first_id):
    """A scored rollout of len(scores) episodes, G per prompt; each episode's tokens hold its id."""
    B = len(scores)
    ids = np.arange(first_id, first_id + B)
    mask = lambda width, real: (np.arange(width)[None, :] < real).astype(np.int32).repeat(B, 0)
    return Rollout(
        prompt=jnp.asarray(np.repeat(ids[:, None], prompt_width, 1), jnp.int32),
        prompt_mask=jnp.asarray(mask(prompt_width, prompt_width)[:, ::-1].copy()),
        response=jnp.asarray(np.repeat(ids[:, None], response_width, 1), jnp.int32),
        response_mask=jnp.asarray(mask(response_width, 2)),
        ended=jnp.ones(B, bool),
        sampler_logprobs=jnp.full((B, response_width), -1.0),
        prompt_index=jnp.asarray(ids // G, jnp.int32),
        logprobs=jnp.full((B, response_width), -1.0),
        ref_logprobs=jnp.full((B, response_width), -1.0),
        reward=Scores(jnp.asarray(scores, jnp.float32)),
    )


# three draws of 4 groups of 2: 1, 2 and 4 informative groups (ties: equal pairs)
DRAWS = [
    draw_of([1, 1, 0, 1, 0, 0, 2, 2], 4, 8, 0),
    draw_of([0, 1, 3, 2, 5, 5, 0.5, 0.5], 8, 4, 100),
    draw_of([0, 1, 1, 0, 0, 2, 2, 0], 4, 4, 200),
]
judge = lambda r: r.replace(scores=r.reward.score)


def test_tied_groups_are_dropped_and_the_metric_is_the_share_dropped():
    batch, m = dynamic_sampling.fill_batch(lambda k: DRAWS[k], judge, G, 8, 0)
    # the first 4 informative groups in draw order: draw 0's second, draw 1's first two, draw 2's first
    np.testing.assert_array_equal(np.asarray(batch.response[:, 0]), [2, 3, 100, 101, 102, 103, 200, 201])
    assert (m["dynamic_sampling/draws"], m["dynamic_sampling/filled_frac"]) == (3, 0.0)
    assert m["dynamic_sampling/dropped_frac"] == pytest.approx(5 / 12)  # 5 of the 12 drawn groups tie
    assert m["dynamic_sampling/drawn_scores"] == pytest.approx(np.mean([d.reward.score for d in DRAWS]))
    scores = np.asarray(batch.reward.score).reshape(-1, G)
    assert np.all(scores[:, 0] != scores[:, 1])
    # one shape: the widest prompt (left-padded) and response (right-padded) of the draws, masks with them
    assert batch.prompt.shape == (8, 8) and batch.response.shape == (8, 8)
    np.testing.assert_array_equal(np.asarray(batch.prompt_mask.sum(1)), [4, 4, 8, 8, 8, 8, 4, 4])
    assert np.asarray(batch.prompt_mask)[0, -1] == 1 and np.asarray(batch.response_mask)[2, 4:].sum() == 0
    np.testing.assert_array_equal(np.asarray(batch.prompt_index), [1, 1, 50, 50, 51, 51, 100, 100])


def test_when_the_draws_run_out_the_batch_is_topped_up_with_dropped_groups():
    batch, m = dynamic_sampling.fill_batch(lambda k: DRAWS[k], judge, G, 2, 0)
    np.testing.assert_array_equal(np.asarray(batch.response[:, 0]), [2, 3, 100, 101, 102, 103, 0, 1])
    assert (m["dynamic_sampling/draws"], m["dynamic_sampling/filled_frac"]) == (2, 0.25)
    assert m["dynamic_sampling/dropped_frac"] == pytest.approx(5 / 8)


CALLS, TRAINED = [], []


def half_tied(prompts, responses, tokens, mask):
    """even_token_share, but a constant for every prompt of even length (a whole group ties), and a
    tie-breaking 1e-3 per row for the others; records each call's (tied groups, groups)."""
    tied = np.asarray([len(p) % 2 == 0 for p in prompts])
    CALLS.append((int(tied[::4].sum()), len(prompts) // 4))
    return np.where(tied, 0.5, even_token_share(prompts, responses, tokens, mask) + 1e-3 * np.arange(len(tied)))


def trained_prompts(prompts, responses, tokens, mask):
    """The monitor: sees the batch the update trains on."""
    TRAINED.extend(prompts)
    return np.zeros(len(prompts), np.float32)


@pytest.mark.slow
def test_grpo_with_dynamic_sampling_trains_only_on_groups_whose_scores_differ_and_learns(tmp_path):
    CALLS.clear(), TRAINED.clear()
    c = tiny(
        grpo_cfg,
        num_steps=24,
        **{
            "reward.function": "tests.test_dynamic_sampling:half_tied",
            "reward.monitor": "tests.test_dynamic_sampling:trained_prompts",
            "pg.dynamic_sampling": True,
            "pg.dynamic_sampling_max_draws": 8,
            "optim.lr": 1e-2,
        },
    )
    pg.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    steps = sorted(m)
    assert all(m[s]["dynamic_sampling/filled_frac"] == 0.0 for s in steps)
    assert TRAINED and not [p for p in TRAINED if len(p) % 2 == 0]  # no tied group reached the update
    assert sum(m[s]["dynamic_sampling/draws"] for s in steps) == len(CALLS)
    dropped = sum(m[s]["dynamic_sampling/dropped_frac"] * m[s]["dynamic_sampling/draws"] * 4 for s in steps)
    assert dropped == pytest.approx(sum(t for t, _ in CALLS)) and dropped > 0
    for key in ("loss/policy_avg", "loss/kl_avg", "objective/kl", "policy/entropy_avg"):
        assert all(np.isfinite(m[s][key]) for s in steps), key
    scores = [m[s]["objective/scores"] for s in steps]  # the untied prompts' even-token share
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.08, scores


def test_dynamic_sampling_needs_groups(tmp_path):
    c = tiny(ppo_cfg, **{"pg.dynamic_sampling": True})  # one sample per prompt
    with pytest.raises(ValueError, match="dynamic_sampling.*samples_per_prompt >= 2"):
        pg.train_and_evaluate(c, str(tmp_path))
