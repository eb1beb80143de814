"""Stage 4: PPO against a reward model, KL-penalised to the SFT policy (lm-human-preferences defaults), run by the
policy-gradient stage `pg` (rlhf_jax/stages/pg.py) with its settings in config.pg.

    python -m rlhf_jax.main --config=configs/ppo.py:tiny --workdir=runs/ppo_tiny
    python -m rlhf_jax.main --config=configs/ppo.py --workdir=runs/ppo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm

Rewards: reward.kind=rm (a trained RM workdir, normalised) or reward.kind=function
(reward.function="package.module:fn", fn(prompts, responses, tokens, mask, **columns) -> [B] scores; several
joined by commas are summed with reward.weights; columns are the prompt records' other fields, e.g. a
ground-truth "answer": rlhf_jax/rewards.py).

The same stage runs the critic-free family by config (configs/grpo.py, rloo.py, reinforce_pp.py, dapo.py,
gspo.py, cispo.py set them):
pg.advantage (gae | grpo | dr_grpo | rloo | reinforce_pp), kl.placement (reward | loss),
kl.estimator (k1 | k2 | k3), pg.loss_aggregation (token_mean | sequence_mean | token_sum);
rlhf_jax/rl.py cites the formula of each.

Preset lm_human_preferences: every algorithmic setting of openai/lm-human-preferences (train_policy.py with
launch.py's sentiment / descriptiveness runs), each cited file:line below, at this file's model scale; its RM
is configs/rm.py:lm_human_preferences (reward normalised on fresh samples of the initial policy):

    python -m rlhf_jax.main --config=configs/rm.py:lm_human_preferences --workdir=runs/rm_lmhp \
        --config.init_from=runs/sft
    python -m rlhf_jax.main --config=configs/ppo.py:lm_human_preferences --workdir=runs/ppo_lmhp \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm_lmhp

How the DEFAULT preset deviates from lm-human-preferences (lm_human_preferences undoes the algorithmic ones):
  pg.num_minibatches 4, not 1 (train_policy.py:50) — 4 updates per epoch from a 64-episode batch (no ablation kept).
  pg.whiten_rewards off, not on (train_policy.py:58) — the RM score is already normalised (no ablation kept).
  pg.missing_eos_penalty None, not −1 (lm_tasks.py:32) — an unended response keeps its RM score (no ablation kept).
  optim.grad_clip_norm 1.0, not none (utils/core.py:621-629) — base_config's guard, kept (no ablation kept).
  batch_size 64 episodes, not 512 (launch.py:124) — 2 CPU cores; 64 is their per-rank batch of 8 ranks.
  num_steps 100 iterations, not 1M / 512 ≈ 1954 (launch.py:123) — minutes, not days.
  rollout.max_new_tokens 32, not 24 (launch.py:11) — a task setting (books); the built-in task's kept.
  rollout.stop_token the task's end token, not '.' = 13 (launch.py:14) — a task setting (book sentences).
  rollout.eos_after 0, not 16 (launch.py:15) — a task setting (book sentences of ≥ 16 tokens).
  The RM's normalisation: the RM's training responses, not fresh policy samples before and after training
    (launch.py:52-54) — needs no init_from policy; configs/rm.py:lm_human_preferences samples it.
Neither preset reproduces (no switch here): the sampler stops at the stop token and later tokens are masked
out of the loss, KL and value (lm-human-preferences samples all response_length tokens, trains on all of them
and truncates only what the RM scores, train_policy.py:285-291, lm_tasks.py:39-52); the score is read at the
last real token, not at the last (padding) position (rewards.py:47, 132); the lr anneals per minibatch update,
not per iteration (train_policy.py:172-173); the RM's normalisation gain and bias are not trained with it
(rewards.py:71); rewards and advantages are whitened over the global batch, not per MPI rank.
"""

from ml_collections.config_dict import placeholder

from rlhf_jax.config import base_config
from rlhf_jax.errors import ConfigError

# configs/grpo.py, rloo.py, dapo.py, ... hold their algorithms' settings as overrides of this file; PPO's are
# this file's defaults. rlhf_jax.algorithms reads every ALGORITHMS and LABELS (the report's names): the
# pipeline's config.policy choices.
ALGORITHMS = {"ppo": {}}
LABELS = {"ppo": "PPO"}


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "pg"  # the policy-gradient stage (stages/pg.py), here running PPO
    c.data.prompts_path = ""  # JSONL {"prompt"} / {"messages"}, hh_rlhf or tldr; empty: built-in prompts
    c.data.prompts_format = "prompt"  # prompt | hh_rlhf | tldr
    c.data.prompts_lines = ()
    c.data.max_prompt_len = 64
    c.data.ptx_path = ""  # pretraining text for PPO-ptx; empty: the built-in corpus
    c.data.ptx_seq_len = 64

    # function: "module:fn" or several joined by commas, summed with weights (a tuple; empty: 1 each)
    # monitor: a second Python score logged as objective/monitor_score (e.g. the built-in gold judge)
    # aggregate: how an RM ensemble's members make one reward (preference.aggregate_rewards): mean | lcb
    # (mean − lcb_coef·std) | min; a single RM is its own mean.
    c.reward = dict(kind="rm", rm_workdir="", function="", weights=(), monitor="", aggregate="mean", lcb_coef=1.0)
    # samples_per_prompt: episodes per prompt in an iteration (batch_size / samples_per_prompt distinct prompts)
    c.rollout = dict(
        max_new_tokens=32,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        stop_token="end",
        eos_after=0,
        samples_per_prompt=1,
        # Shapes that follow the data: each iteration pads its prompts (and cuts its responses) to the smallest
        # length_bucket·2^k holding the longest, capped at data.max_prompt_len (rollout.max_new_tokens), so few
        # programs compile (perf/compilations counts them); decoding stops once every response has ended.
        # 0: always the caps.
        length_bucket=16,
    )
    c.pg = dict(
        epochs=4,
        num_minibatches=4,
        clip_range=0.2,
        clip_range_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        entropy_coef=0.0,
        whiten_rewards=False,
        score_clip=0.0,
        missing_eos_penalty=placeholder(float),  # None (off) unless set, e.g. --config.pg.missing_eos_penalty=-1
        ptx_coef=0.0,
        ptx_batch_size=8,
        critic="shared",
        score_baseline="none",  # none | loo: minus the mean score of the prompt's other samples
        advantage="gae",  # gae (with a critic) | grpo | dr_grpo | rloo | reinforce_pp (critic-free)
        whiten_advantages=True,  # per minibatch, as lm-human-preferences
        loss_aggregation="token_mean",  # token_mean | sequence_mean (GRPO) | token_sum (Dr. GRPO)
        # the policy loss, by name from rlhf_jax.rl.POLICY_LOSSES: ppo_clip | dual_clip | gspo | cispo
        policy_loss="ppo_clip",
        clip_range_high=0.0,  # ε_high of the ratio's clip (DAPO's clip-higher; CISPO's bound); 0: clip_range
        dual_clip_c=3.0,  # dual_clip's lower bound c·A for negative advantages (Ye et al. 2020)
        # DAPO's soft overlong punishment (rl.overlong_penalty): a length reward falling from 0 to -1 over the
        # last overlong_cache tokens of the response budget (rollout.max_new_tokens); 0: off
        overlong_cache=0,
        # DAPO's dynamic sampling (rlhf_jax/dynamic_sampling.py): drop prompt groups whose scores are all equal and
        # draw again, at most dynamic_sampling_max_draws batches an iteration (then topped up with dropped groups)
        dynamic_sampling=False,
        dynamic_sampling_max_draws=4,
        # the sampler–trainer mismatch (rl.rollout_correction): w = π_old / π_sampler, logged always as sampler/*;
        # none | tis (truncated at the cap) | mis (masked beyond it), per token or per sequence
        rollout_correction="none",
        correction_level="token",
        correction_cap=2.0,
    )
    # lm-human-preferences: adaptive KL, β0 = 0.15, target 6 nats, horizon 10,000 episodes, k1 in the reward.
    c.kl = dict(kind="adaptive", init_coef=0.15, target=6.0, horizon=10000, estimator="k1", placement="reward")
    # lm-human-preferences: TF-style Adam, lr 1e-5 (here larger: small models), eps 1e-5, linear anneal to 0.
    c.optim.update(
        name="tf_adam",
        lr=1e-5,
        schedule="linear",
        warmup_steps=0,
        final_lr_fraction=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-5,
        weight_decay=0.0,
        grad_clip_norm=1.0,
    )
    c.batch_size, c.num_steps = 64, 100  # episodes per iteration, iterations
    c.log_every, c.sample_every = 1, 10
    c.checkpoint.every = 20

    if preset == "tiny":
        c.data.max_prompt_len, c.data.ptx_seq_len, c.data.vocab_size = 48, 32, 384
        c.model.update(d_model=32, n_layers=2, n_heads=2, max_len=64)
        c.reward.update(kind="function", function="rlhf_jax.rewards:fraction_of_vowels")
        c.rollout.max_new_tokens = 12
        c.pg.update(epochs=2, num_minibatches=2)
        c.optim.lr = 1e-3
        c.batch_size, c.num_steps = 8, 4
        c.checkpoint.every, c.sample_every = 2, 2
    elif preset == "lm_human_preferences":
        lm_human_preferences(c)
    elif preset != "default":
        raise ConfigError(f"configs/ppo.py: unknown preset {preset!r}; use tiny, default or lm_human_preferences.")
    return c


def lm_human_preferences(c):
    """openai/lm-human-preferences' PPO (commit cbfd210; file:line of that repository), at this file's default
    scale: batch_size and num_steps stay (module docstring). One minibatch of the 64 episodes is exactly their
    per-rank minibatch (512 episodes over 8 MPI ranks, launch.py:124, :192), the batch their whitening sees."""
    c.reward.kind = "rm"  # a trained RM: configs/rm.py:lm_human_preferences (launch.py:133-134)
    c.rollout.update(
        temperature=0.7,  # launch.py:17 policy.temperature; log-probs at it too, policy.py:121
        max_new_tokens=32,  # response_length (launch.py:11: 24) — a task setting, see the docstring
        stop_token="end",  # truncate_token (launch.py:14: '.') — the built-in task's end of a response
        eos_after=0,  # truncate_after (launch.py:15: 16) — a task setting, see the docstring
        top_k=0,
        top_p=1.0,  # no filtering: sample_sequence gets only the temperature, policy.py:100-106
        samples_per_prompt=1,
    )  # one response per query (train_policy.py:284-285)
    c.data.max_prompt_len = 64  # query_length, launch.py:9
    c.pg.update(
        epochs=4,  # noptepochs, train_policy.py:51
        num_minibatches=1,  # nminibatches, train_policy.py:50
        clip_range=0.2,  # cliprange, train_policy.py:54
        clip_range_value=0.2,  # cliprange_value, train_policy.py:55
        vf_coef=0.1,  # train_policy.py:53
        gamma=1.0,  # train_policy.py:56
        lam=0.95,  # train_policy.py:57
        whiten_rewards=True,  # train_policy.py:58, applied at :324-325 (shift_mean=False)
        whiten_advantages=True,  # train_policy.py:338
        entropy_coef=0.0,  # loss = pg_loss + vf_coef·vf_loss, train_policy.py:357
        score_clip=0.0,  # scores used as they are, train_policy.py:149-154
        missing_eos_penalty=-1.0,  # penalty_reward_value, lm_tasks.py:32, applied train_policy.py:388-390
        ptx_coef=0.0,  # no pretraining mix (train_policy.py:357)
        critic="shared",  # the value head on the policy's trunk, policy.py:28 scalar_heads=['value']
        score_baseline="none",
        advantage="gae",  # GAE, train_policy.py:327-336
        loss_aggregation="token_mean",
    )  # tf.reduce_mean over [B, T], train_policy.py:347, :354
    c.kl.update(
        kind="adaptive",  # rewards.adaptive_kl on, launch.py:130 (AdaptiveKLController, train_policy.py:115-124)
        init_coef=0.15,  # rewards.kl_coef, launch.py:129
        target=6.0,  # rewards.adaptive_kl.target, launch.py:131
        horizon=10000,  # episodes, train_policy.py:28
        estimator="k1",  # kl = logprobs − ref_logprobs, train_policy.py:150
        placement="reward",
    )  # −β·KL per token, the score on the last, train_policy.py:151-153
    c.optim.update(
        name="tf_adam",
        eps=1e-5,
        b1=0.9,
        b2=0.999,  # tf.train.AdamOptimizer(epsilon=1e-5), utils/core.py:627
        grad_clip_norm=0.0,  # none: utils/core.py:621-629 applies the raw (all-reduced) gradients
        weight_decay=0.0,  # plain Adam, utils/core.py:627
        lr=1e-5,  # ppo.lr, launch.py:122
        schedule="linear",
        warmup_steps=0,
        final_lr_fraction=0.0,
    )  # lr·(1 − step/nupdates), train_policy.py:172-173
    return c
