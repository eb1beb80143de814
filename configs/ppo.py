"""Stage 4: PPO against a reward model, KL-penalised to the SFT policy (lm-human-preferences defaults).

    python -m rlhf_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo_tiny
    python -m rlhf_jax.main --config=configs/ppo.py --workdir=runs/ppo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm

Rewards: reward.kind=rm (a trained RM workdir, normalised) or reward.kind=function
(reward.function="package.module:fn", fn(prompts, responses, tokens, mask) -> [B] scores).

The same stage runs the critic-free family by config (configs/grpo.py, configs/rloo.py set them):
ppo.advantage (gae | grpo | dr_grpo | rloo | reinforce_pp), kl.placement (reward | loss),
kl.estimator (k1 | k2 | k3), ppo.loss_aggregation (token_mean | sequence_mean | token_sum);
rlhf_jax/rl.py cites the formula of each.
"""

from rlhf_jax.config import base_config

# configs/grpo.py, rloo.py, reinforce_pp.py hold their algorithms' settings as overrides of this file; PPO's
# are this file's defaults (the pipeline's config.policy reads ALGORITHMS).
ALGORITHMS = {"ppo": {}}


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "ppo"
    c.data.prompts_path = ""  # JSONL {"prompt"} / {"messages"}, hh_rlhf or tldr; empty: built-in prompts
    c.data.prompts_format = "prompt"  # prompt | hh_rlhf | tldr
    c.data.prompts_lines = ()
    c.data.max_prompt_len = 64
    c.data.ptx_path = ""  # pretraining text for PPO-ptx; empty: the built-in corpus
    c.data.ptx_seq_len = 64

    # monitor: a second Python score logged as objective/monitor_score (e.g. the built-in gold judge)
    c.reward = dict(kind="rm", rm_workdir="", function="", monitor="")
    # samples_per_prompt: episodes per prompt in an iteration (batch_size / samples_per_prompt distinct prompts)
    c.rollout = dict(max_new_tokens=32, temperature=0.7, top_k=0, top_p=1.0, stop_token="end", eos_after=0,
                     samples_per_prompt=1)
    c.ppo = dict(epochs=4, num_minibatches=4, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1,
                 gamma=1.0, lam=0.95, entropy_coef=0.0, whiten_rewards=False, score_clip=0.0,
                 missing_eos_penalty=None, ptx_coef=0.0, ptx_batch_size=8, critic="shared",
                 score_baseline="none",  # none | loo: minus the mean score of the prompt's other samples
                 advantage="gae",  # gae (with a critic) | grpo | dr_grpo | rloo | reinforce_pp (critic-free)
                 whiten_advantages=True,  # per minibatch, as lm-human-preferences
                 loss_aggregation="token_mean")  # token_mean | sequence_mean (GRPO) | token_sum (Dr. GRPO)
    # lm-human-preferences: adaptive KL, β0 = 0.15, target 6 nats, horizon 10,000 episodes, k1 in the reward.
    c.kl = dict(kind="adaptive", init_coef=0.15, target=6.0, horizon=10000, estimator="k1", placement="reward")
    # lm-human-preferences: TF-style Adam, lr 1e-5 (here larger: small models), eps 1e-5, linear anneal to 0.
    c.optim.update(name="tf_adam", lr=1e-5, schedule="linear", warmup_steps=0, final_lr_fraction=0.0,
                   b1=0.9, b2=0.999, eps=1e-5, weight_decay=0.0, grad_clip_norm=1.0)
    c.batch_size, c.num_steps = 64, 100  # episodes per iteration, iterations
    c.log_every, c.sample_every = 1, 10
    c.checkpoint.every = 20

    if preset == "tiny":
        c.data.max_prompt_len, c.data.ptx_seq_len, c.data.vocab_size = 48, 32, 384
        c.model.update(d_model=32, n_layers=2, n_heads=2, max_len=64)
        c.reward.update(kind="function", function="rlhf_jax.rewards:fraction_of_vowels")
        c.rollout.max_new_tokens = 12
        c.ppo.update(epochs=2, num_minibatches=2)
        c.optim.lr = 1e-3
        c.batch_size, c.num_steps = 8, 4
        c.checkpoint.every, c.sample_every = 2, 2
    elif preset != "default":
        raise ValueError(f"configs/ppo.py: unknown preset {preset!r}; use tiny or default.")
    return c
