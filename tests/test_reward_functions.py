"""Reward functions as TRL users write them: several, weighted, each given the prompt records' other fields
(a ground-truth answer column) for its own episodes; GRPO trains on their sum and logs each one."""

import json

import numpy as np
import pytest

import configs.grpo as grpo_cfg
from rlhf_jax import rewards
from rlhf_jax.data import prompts as prompt_data
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import pg
from rlhf_jax.tasks import answers
from rlhf_jax.tasks.instructions import parse_instruction, solve_instruction
from tests.helpers import by_step, tiny
from tests.test_pg_stage import even_token_share


def answer_matches_prompt(prompts, responses, tokens, mask, answer):
    """1 where the answer an episode received is its own prompt's solution: the column reached the right
    episode (a prompt repeated in a group, shuffled batches, every process's episodes)."""
    return np.asarray([float(solve_instruction(parse_instruction(p)) == a) for p, a in zip(prompts, answer)])


def with_kwargs(prompts, responses, tokens, mask, **columns):
    return np.asarray([float(set(columns) == {"answer", "source"})] * len(prompts))


@pytest.mark.slow
def test_grpo_sums_weighted_functions_that_read_the_answer_column_and_logs_each(tmp_path):
    path = answers.write_answer_prompts(str(tmp_path / "answers.jsonl"), 64, seed=3)
    c = tiny(
        grpo_cfg,
        num_steps=20,
        **{
            "optim.lr": 1e-2,
            "checkpoint.every": 100,
            "data.prompts_path": path,
            "reward.kind": "function",
            "reward.function": (
                "tests.test_reward_functions:answer_matches_prompt,tests.test_pg_stage:even_token_share,"
                "rlhf_jax.tasks.answers:answer_overlap"
            ),
            "reward.weights": (0.0, 1.0, 0.5),
        },
    )
    pg.train_and_evaluate(c, str(tmp_path / "run"))
    m = by_step(read_metrics(str(tmp_path / "run")))
    steps = sorted(m)
    # every episode was given its own record's answer, at every iteration
    assert all(m[s]["reward/answer_matches_prompt"] == 1.0 for s in steps)
    # the score trained on is the weighted sum of the logged parts (no missing-EOS penalty or clip here)
    for s in steps:
        want = m[s]["reward/even_token_share"] + 0.5 * m[s]["reward/answer_overlap"]
        assert m[s]["objective/scores"] == pytest.approx(want, abs=1e-5)
    # ... and the policy learns what it rewards (a tiny model from scratch only moves the token-parity part)
    scores, even = ([m[s][k] for s in steps] for k in ("objective/scores", "reward/even_token_share"))
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.1, scores
    assert np.mean(even[-4:]) > np.mean(even[:4]) + 0.1, even


def test_a_function_gets_the_columns_it_names_or_all_with_kwargs_and_a_missing_one_is_named():
    f = rewards.RewardFunction(
        rewards.import_functions("tests.test_reward_functions:with_kwargs", "k"), None, None, None
    )
    columns = {"answer": ["4"], "source": ["x"]}
    assert f.arguments("with_kwargs", with_kwargs, columns) == columns
    assert f.arguments("m", answer_matches_prompt, columns) == {"answer": ["4"]}
    assert f.arguments("e", even_token_share, columns) == {}  # the four-argument form still works
    with pytest.raises(ValueError, match=r"answer_matches_prompt takes \['answer'\].*'source'.*prompts_path"):
        f.arguments("answer_matches_prompt", answer_matches_prompt, {"source": ["x"]})


def test_weights_must_match_the_functions_and_names_stay_distinct():
    fns = rewards.import_functions(
        "rlhf_jax.tasks.answers:exact_answer, rlhf_jax.tasks.answers:answer_overlap,"
        "rlhf_jax.tasks.answers:exact_answer",
        "reward.function",
    )
    assert list(fns) == ["exact_answer_0", "answer_overlap", "exact_answer_2"]
    assert rewards.RewardFunction(fns, None, None, None).weights.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="reward.weights has 2 values for the 3 functions"):
        rewards.RewardFunction(fns, None, None, None, weights=(1.0, 0.5))
    with pytest.raises(ValueError, match="reward.function is empty"):
        rewards.import_functions(" ", "reward.function")


def test_the_answer_checkers_follow_the_judges_normalisation():
    responses = ["2 5 9.", "2, 5 9<|end|> extra", "9 5 2", ""]
    answer = ["2 5 9"] * 4
    np.testing.assert_array_equal(answers.exact_answer(None, responses, None, None, answer), [1, 1, 0, 0])
    np.testing.assert_allclose(
        answers.answer_overlap(None, responses, None, None, answer), [1.0, 1.0, 1 / 3, 0.0], rtol=1e-6
    )


def test_prompt_columns_are_each_records_other_fields_in_index_order(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a", "answer": "1", "id": 7},
        {"messages": [{"role": "user", "content": "b"}], "answer": "2"},
        {"prompt": "c"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prompt_data.prompt_columns(str(path), "prompt") == [{"answer": "1", "id": 7}, {"answer": "2"}, {}]
    assert prompt_data.prompt_columns(str(path), "prompt", (1, 3)) == [{"answer": "2"}, {}]
