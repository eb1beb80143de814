"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): GRPO's group
advantage with four changes, each a switch of the policy-gradient stage.

    python -m rlhf_jax.main --config=configs/dapo.py:tiny --workdir=runs/dapo_tiny      # verifiable reward, CPU
    python -m rlhf_jax.main --config=configs/dapo.py --workdir=runs/dapo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=dapo --workdir=runs/dapo_pipeline \
        --config.reuse_from=runs/quickstart

Presets: default, tiny. As the paper states it:
  - clip-higher (§3.1): ε_low = 0.2, ε_high = 0.28 (pg.clip_range, pg.clip_range_high of ppo_clip);
  - dynamic sampling (§3.2): groups whose G rewards are all equal (all right, all wrong) are dropped and more
    prompts drawn until the batch is full (pg.dynamic_sampling; at most pg.dynamic_sampling_max_draws = 4
    batches an iteration, then topped up with dropped groups: rlhf_jax/dynamic_sampling.py);
  - token-level policy-gradient loss (§3.3): every token of the batch weighs the same (token_mean);
  - overlong reward shaping (§3.4, eq. 13): L_cache = 4096 of L_max = 20480, a fifth of the response
    budget: here 5 tokens (pg.overlong_cache; the pipeline's budget is 24, configs/ppo.py's 32);
  - no KL penalty (§2.3: "we exclude the KL term"): β = 0;
  - G = 16 responses per prompt; 16 gradient updates per rollout batch (minibatches of 512 of its 512 × 16
    episodes, §4.1): here 4 minibatches of a 64-episode batch (16 episodes each, a size setting), so the
    ratio moves off 1 and the asymmetric clip acts.
  Their learning rate (1e-6, for a 32B model) is not carried over: the lr is a size setting.
"""

from rlhf_jax.config import config_module

# GRPO's group-relative advantage and k3 KL in the loss (configs/grpo.py), with this paper's changes
_GRPO = config_module("grpo")
GRPO = _GRPO.ALGORITHMS["grpo"]
ALGORITHMS = {
    "dapo": dict(
        pg={
            **GRPO["pg"],
            "loss_aggregation": "token_mean",
            "num_minibatches": 4,
            "policy_loss": "ppo_clip",
            "clip_range": 0.2,
            "clip_range_high": 0.28,
            "dynamic_sampling": True,
            "overlong_cache": 5,
        },
        kl={**GRPO["kl"], "init_coef": 0.0},
        rollout=dict(samples_per_prompt=16),
    ),
}
LABELS = {"dapo": "DAPO"}


def get_config(preset: str = "default"):
    return _GRPO.group_preset("dapo", ALGORITHMS["dapo"], preset, overlong_cache=2)  # a fifth of its 12-token budget
