"""The DPO stage end to end: on the built-in rule it learns an implicit reward model that ranks held-out
comparisons (≥ 0.9), every loss runs, online DPO raises a verifiable score, resume is exact, bad settings
are named."""

import numpy as np
import pytest

import configs.dpo as dpo_cfg
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import dpo
from tests.helpers import by_step, resumed_from, stopped_copy, tiny


@pytest.mark.slow
def test_dpo_tiny_learns_the_builtin_rule_as_an_implicit_reward_model(tmp_path):
    out = dpo.train_and_evaluate(tiny(dpo_cfg), str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    assert out["eval/rewards/accuracies"] >= 0.9, out  # held-out pairs ranked by β·(log π − log π_ref)
    # the policy's log-prob margin (chosen − rejected) rose above the reference's: β·that rise is the
    # reward margin, 0 at the start (π = π_ref)
    assert m[20]["eval/rewards/margins"] > 0 and m[40]["eval/rewards/margins"] > m[20]["eval/rewards/margins"]
    assert (m[40]["eval/logps/chosen"] - m[40]["eval/logps/rejected"]) > (
        m[20]["eval/logps/chosen"] - m[20]["eval/logps/rejected"]
    )
    assert m[40]["loss"] < m[10]["loss"]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "perf/step_time_s",
    ):
        assert np.isfinite(m[40][key]), key


@pytest.mark.parametrize("preset", ["ipo_tiny", "simpo_tiny", "plackett_luce_tiny"])
def test_every_loss_trains(tmp_path, preset):
    c = tiny(dpo_cfg, num_steps=10, eval_every=10)
    c.update_from_flattened_dict(dict(dpo_cfg.get_config(preset).dpo.items()), "dpo.")
    out = dpo.train_and_evaluate(c, str(tmp_path))
    assert np.isfinite(out["eval/loss"]) and out["eval/rewards/accuracies"] > 0.6, out


@pytest.mark.slow
def test_dpo_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    full = tiny(dpo_cfg, num_steps=6, eval_every=3, **{"checkpoint.every": 3, "optim.total_steps": 6, "log_every": 3})
    dpo.train_and_evaluate(full, str(tmp_path / "full"))
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", 3)
    dpo.train_and_evaluate(full, str(resumed))  # the same command again: resumes at step 3
    assert resumed_from(capsys.readouterr().out) == 3
    a, b = by_step(read_metrics(str(tmp_path / "full"))), by_step(read_metrics(str(resumed)))
    for key in ("loss", "rewards/margins", "eval/loss", "eval/rewards/accuracies"):
        assert a[6][key] == pytest.approx(b[6][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_online_dpo_raises_a_verifiable_score(tmp_path):
    c = tiny(
        dpo_cfg,
        num_steps=20,
        **{  # 8 prompts x 4 samples, ranked by the score
            "reward.function": "tests.test_pg_stage:even_token_share",
            "optim.lr": 1e-2,
            "log_every": 1,
            "checkpoint.every": 100,
        },
    )
    c.update_from_flattened_dict({"dpo.online": True, "online.samples_per_prompt": 4})
    dpo.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    scores = [m[s]["objective/scores"] for s in sorted(m) if "objective/scores" in m[s]]
    assert len(scores) == 20 and np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.1, scores
    assert np.isfinite(m[20]["rewards/accuracies"]) and m[20]["time/generate_s"] > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dpo.loss": "kto"}, "dpo.loss='kto' is unknown"),
        ({"dpo.beta": 0.0}, "dpo.beta=0.0 must be > 0"),
        ({"dpo.label_smoothing": 0.5}, r"label_smoothing=0.5 must be in \[0, 0.5\)"),
        ({"dpo.online": True, "online.samples_per_prompt": 1}, "samples_per_prompt=1 must be >= 2"),
        ({"dpo.online": True, "rollout.temperature": 0.0}, "greedy decoding would give K equal responses"),
    ],
)
def test_bad_settings_are_named(tmp_path, kw, match):
    c = tiny(dpo_cfg)
    c.update_from_flattened_dict(kw)
    with pytest.raises(ValueError, match=match):
        dpo.train_and_evaluate(c, str(tmp_path))


def test_online_dpo_trains_under_dropout_as_offline_dpo_does():
    # The policy's log-probs of its own samples take the step's dropout key (model.dropout), as the comparisons'
    # do offline; without a key (the reference, the evaluation) and at dropout 0 they are deterministic.
    import dataclasses

    import flax.linen as nn
    import jax

    from rlhf_jax import train_state
    from rlhf_jax.models.gpt import TransformerLM
    from rlhf_jax.models.layers import ModelConfig

    model = TransformerLM(
        ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.5, dtype="float32")
    )
    params = nn.meta.unbox(jax.jit(train_state.model_init_fn(model, 8, 0))())
    tokens = jax.random.randint(jax.random.key(0), (2, 2, 8), 1, 64)
    batch = {
        "prompt": tokens[..., :5],
        "prompt_mask": np.ones((2, 2, 5), np.int32),
        "response": tokens[..., 5:],
        "response_mask": np.ones((2, 2, 3), np.int32),
    }
    plain, lengths = dpo.online_logps(params, model, batch)
    first, _ = dpo.online_logps(params, model, batch, jax.random.key(1))
    second, _ = dpo.online_logps(params, model, batch, jax.random.key(2))
    assert lengths.tolist() == [[3, 3], [3, 3]]
    assert not np.allclose(first, plain) and not np.allclose(first, second)
    np.testing.assert_array_equal(dpo.online_logps(params, model, batch)[0], plain)
    no_dropout = TransformerLM(dataclasses.replace(model.cfg, dropout=0.0))
    np.testing.assert_allclose(dpo.online_logps(params, no_dropout, batch, jax.random.key(1))[0], plain, rtol=1e-6)
