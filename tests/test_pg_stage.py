"""The policy-gradient stage (`pg`) running PPO end to end on a verifiable reward: it learns, logs the field's
metrics; settings it cannot honour, and the stage's old name, are refused naming the fix. That PPO resumes exactly
is tests/test_kill_drill.py's (every logged number bit for bit after SIGKILL and SIGTERM, on 2 processes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import configs.ppo as ppo_cfg
from rlhf_jax.metrics import read_metrics
from rlhf_jax.stages import pg
from tests.helpers import by_step, tiny


def even_token_share(prompts, responses, tokens, mask):
    """Verifiable reward: the share of response tokens whose id is even (0.5 for a uniform policy)."""
    mask = np.asarray(mask, np.float32)
    return ((np.asarray(tokens) % 2 == 0) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def config(**kw):
    return tiny(ppo_cfg, **{"reward.function": "tests.test_pg_stage:even_token_share", **kw})


@pytest.mark.slow
def test_ppo_raises_a_verifiable_reward(tmp_path):
    c = config(num_steps=16, batch_size=16, **{"optim.lr": 1e-2, "kl.init_coef": 0.01, "checkpoint.every": 100})
    pg.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    scores = [m[s]["objective/scores"] for s in sorted(m)]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    for key in (
        "objective/kl",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/ratio",
        "kl_coef",
        "perf/rollout_tokens_per_sec",
        "time/generate_s",
        "time/update_s",
    ):
        assert np.isfinite(m[16][key]), key
    assert m[16]["kl_coef"] != pytest.approx(0.01)  # the adaptive controller moved β
    assert (tmp_path / "samples.jsonl").exists()


@pytest.mark.slow
def test_ppo_ptx_and_a_critic_initialised_from_the_reward_model(tmp_path):
    import configs.pretrain as pretrain_cfg
    import configs.rm as rm_cfg
    from rlhf_jax.stages import lm, rm

    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=5), str(tmp_path / "pt"))
    rm.train_and_evaluate(tiny(rm_cfg, num_steps=5, init_from=str(tmp_path / "pt")), str(tmp_path / "rm"))
    c = config(
        num_steps=2,
        init_from=str(tmp_path / "pt"),
        **{
            "reward.kind": "rm",
            "reward.rm_workdir": str(tmp_path / "rm"),
            "pg.critic": "reward_model",
            "pg.ptx_coef": 0.5,
            "reward.monitor": "tests.test_pg_stage:even_token_share",
        },
    )
    out = pg.train_and_evaluate(c, str(tmp_path / "ppo"))
    assert np.isfinite(out["loss/ptx_avg"]) and out["loss/ptx_avg"] > 0
    assert 0.0 <= out["objective/monitor_score"] <= 1.0
    # the checkpoint holds the policy and the separate critic (InstructGPT's value function from the RM)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(str(tmp_path / "ppo" / "checkpoints"), item_names=("params",)) as m:
        saved = m.restore(m.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    assert set(saved) == {"policy", "critic"}
    assert set(saved["critic"]) >= {"trunk", "value_head", "reward_head"}
    # a workdir written before the stage was renamed (stage "ppo", block config.ppo) still loads as a policy
    from rlhf_jax import parallel, trained

    cfg_path = tmp_path / "ppo" / "config.json"
    written = json.loads(cfg_path.read_text())
    written["stage"], written["ppo"] = "ppo", written.pop("pg")
    cfg_path.write_text(json.dumps(written))
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    _, params, _ = trained.load_policy(str(tmp_path / "ppo"), mesh, parallel.DEFAULT_RULES)
    np.testing.assert_array_equal(params["trunk"]["embed"], saved["policy"]["trunk"]["embed"])


def test_ppo_with_several_samples_per_prompt_and_a_leave_one_out_baseline(tmp_path):
    # The RLOO-style variant: 4 samples of each of 4 prompts per iteration, each score minus the mean of
    # its prompt's other samples; it must still raise the verifiable reward.
    c = config(
        num_steps=16,
        batch_size=16,
        **{
            "optim.lr": 1e-2,
            "kl.init_coef": 0.01,
            "checkpoint.every": 100,
            "rollout.samples_per_prompt": 4,
            "pg.score_baseline": "loo",
        },
    )
    pg.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    scores = [m[s]["objective/scores"] for s in sorted(m)]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rollout.samples_per_prompt": 3}, "samples_per_prompt=3 must be >= 1 and divide batch_size=8"),
        ({"pg.score_baseline": "loo"}, "score_baseline='loo' needs config.rollout.samples_per_prompt >= 2"),
        ({"pg.score_baseline": "mean"}, r"score_baseline='mean' is unknown; use one of \('none', 'loo'\)"),
        ({"pg.advantage": "vtrace"}, "pg.advantage='vtrace' is unknown; use one of"),
        ({"kl.placement": "both"}, "kl.placement='both' is unknown"),
        ({"pg.advantage": "rloo"}, "advantage='rloo' needs config.rollout.samples_per_prompt >= 2"),
        ({"pg.advantage": "grpo"}, "a group of one has advantage 0"),
        (
            {"pg.advantage": "grpo", "rollout.samples_per_prompt": 2, "pg.critic": "reward_model"},
            "only 'gae' uses a critic",
        ),
        ({"rollout.temperature": 0.0}, "greedy decoding has none"),
        # log-probs of the untruncated distribution would not be those the tokens were drawn from
        ({"rollout.top_k": 3}, "top_k=3 / top_p=1.0: the policy-gradient stage's log-probs are those of the"),
        ({"rollout.top_p": 0.9}, "Sample with the temperature alone"),
        ({"pg.num_minibatches": 3}, "batch_size=8 episodes do not split into pg.num_minibatches=3"),
        # keys every stage has that this one cannot honour are refused, not ignored
        ({"eval_every": 5}, "config.eval_every=5 has no effect in the policy-gradient stage: it has no held-out"),
        ({"eval_batches": 0}, "config.eval_batches=0 has no effect in the policy-gradient stage"),
    ],
)
def test_ppo_batch_settings_that_do_not_fit_are_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        pg.train_and_evaluate(config(num_steps=1, batch_size=8, **kw), str(tmp_path))


def test_grad_accum_is_refused_naming_the_minibatches_that_do_its_job(tmp_path):
    with pytest.raises(ValueError, match="config.grad_accum=2 has no effect .* set pg.num_minibatches"):
        pg.train_and_evaluate(config(num_steps=1, batch_size=16, grad_accum=2), str(tmp_path))


TOKENIZER_SIZE = 384  # the tiny presets' tokenizer


def only_tokenizer_ids(prompts, responses, tokens, mask):
    """A reward that fails the run if a sampled id is outside the tokenizer (a padded vocabulary row)."""
    real = np.asarray(tokens)[np.asarray(mask) > 0]
    assert real.size and real.max() < TOKENIZER_SIZE, f"sampled id {real.max()} >= {TOKENIZER_SIZE}"
    return even_token_share(prompts, responses, tokens, mask)


@pytest.mark.slow
def test_a_padded_vocabulary_samples_and_scores_only_tokenizer_ids(tmp_path):
    # 512 embedding rows for a 384-piece tokenizer, as Pythia pads 50,277 tokens to 50,304: the extra rows'
    # logits are masked, so nothing samples, decodes or scores an id the tokenizer does not have.
    import configs.pretrain as pretrain_cfg
    import configs.rm as rm_cfg
    from rlhf_jax import checkpoint
    from rlhf_jax.stages import lm, rm

    lm.train_and_evaluate(tiny(pretrain_cfg, num_steps=3, **{"model.vocab_size": 512}), str(tmp_path / "pt"))
    saved = checkpoint.read_run_config(str(tmp_path / "pt"))["model"]
    assert (saved["vocab_size"], saved["token_vocab"]) == (512, TOKENIZER_SIZE)
    rm.train_and_evaluate(tiny(rm_cfg, num_steps=2, init_from=str(tmp_path / "pt")), str(tmp_path / "rm"))
    # the monitor fails the run on a sampled id outside the tokenizer; the RM scores what was sampled
    out = pg.train_and_evaluate(
        config(
            num_steps=2,
            init_from=str(tmp_path / "pt"),
            **{
                "reward.kind": "rm",
                "reward.rm_workdir": str(tmp_path / "rm"),
                "reward.monitor": "tests.test_pg_stage:only_tokenizer_ids",
            },
        ),
        str(tmp_path / "with_rm"),
    )
    assert np.isfinite(out["objective/scores"]) and 0.0 <= out["objective/monitor_score"] <= 1.0
    assert np.isfinite(out["objective/entropy"]) and np.isfinite(out["objective/kl"])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_old_stage_name_and_block_are_refused_naming_the_new_ones(tmp_path):
    from rlhf_jax.config import check_renamed_flags, renamed_key

    old = config(num_steps=1)
    old.stage = "ppo"
    with pytest.raises(ValueError, match="config.stage: 'ppo' was renamed 'pg'.*Set config.stage='pg'"):
        pg.train_and_evaluate(old, str(tmp_path / "old_stage"))
    old = config(num_steps=1)
    old.ppo = old.pg.to_dict()  # a config file that still builds a ppo block
    with pytest.raises(ValueError, match="rename the config.ppo block config.pg"):
        pg.train_and_evaluate(old, str(tmp_path / "old_block"))
    assert renamed_key("ppo.ppo.ptx_coef") == "pg.pg.ptx_coef" and renamed_key("policy") is None
    with pytest.raises(SystemExit, match=r"--config.ppo.ppo.ptx_coef is --config.pg.pg.ptx_coef now"):
        check_renamed_flags(["pipeline.py", "--config=configs/pipeline.py", "--config.ppo.ppo.ptx_coef=1"])
    check_renamed_flags(["main.py", "--config=configs/ppo.py:tiny", "--config.policy=ppo"])  # values are not keys


def test_an_old_key_on_the_command_line_fails_naming_the_new_one(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_jax.main",
            "--config=configs/grpo.py:tiny",
            f"--workdir={tmp_path}",
            "--config.ppo.epochs=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "--config.ppo.epochs is --config.pg.epochs now" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.listdir(tmp_path)  # before anything ran
